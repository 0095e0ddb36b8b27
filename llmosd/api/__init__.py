from llmosd.api.app import make_app
from llmosd.api.state import AppState

__all__ = ["AppState", "make_app"]
