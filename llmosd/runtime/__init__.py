from llmosd.runtime.backend import Backend, Output
from llmosd.runtime.loader import LoadedModel, load
from llmosd.runtime.providers import Placement, ProviderSelector

__all__ = ["Backend", "LoadedModel", "Output", "Placement", "ProviderSelector", "load"]
