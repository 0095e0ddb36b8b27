from llmosd.runtime.backend import Backend, Output
from llmosd.runtime.loader import LoadedModel, Loader, load
from llmosd.runtime.providers import Placement, ProviderSelector

__all__ = ["Backend", "LoadedModel", "Loader", "Output", "Placement", "ProviderSelector", "load"]
