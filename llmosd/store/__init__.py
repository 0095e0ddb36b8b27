from llmosd.store.manifest import FileEntry, Manifest, ManifestError, TensorSpec
from llmosd.store.names import InvalidName, check_name, check_version
from llmosd.store.store import IntegrityError, ModelStore, NotFound, StoreError, sweep_tmp

__all__ = [
    "FileEntry",
    "IntegrityError",
    "InvalidName",
    "Manifest",
    "ManifestError",
    "ModelStore",
    "NotFound",
    "StoreError",
    "TensorSpec",
    "check_name",
    "check_version",
    "sweep_tmp",
]
