"""The Python client, standard library only: ``Client().load_model("smollm2-135m-instruct").generate_text("...")``.

It talks to the local Unix socket when there is one (no token needed), else to ``LLMOSD_URL`` with the
token from ``LLMOSD_TOKEN``. Discovery over mDNS and the async client come with the discovery work.
"""

from llmosd.client.errors import ApiError, ConnectionFailed, LlmosdError
from llmosd.client.sync import Client, Model

__all__ = ["ApiError", "Client", "ConnectionFailed", "LlmosdError", "Model"]
