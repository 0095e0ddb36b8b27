"""Model versions: one service for pull, smoke test, activation and rollback (service.py), and the
registry sync that drives it from subscriptions (sync.py)."""

from llmosd.versions.service import Activated, ModelVersions, NoOlderVersion
from llmosd.versions.sync import Syncer, SyncPolicy, parse_subscriptions

__all__ = ["Activated", "ModelVersions", "NoOlderVersion", "SyncPolicy", "Syncer", "parse_subscriptions"]
