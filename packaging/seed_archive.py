"""Build the models archive a .deb seeds the store from (``seed_archive``): the default models, taken
from STORE when it has them, else exported now (this needs the export extra: PyTorch, optimum).

    python packaging/seed_archive.py OUT.tar [--store DIR] [--precision auto]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

from llmosd.export import export_model
from llmosd.registry.airgap import StoreModel, export_archive
from llmosd.seed import DEFAULT_MODELS
from llmosd.store import ModelStore
from llmosd.tasks import discover


async def build(out: Path, store_dir: Path, precision: str) -> None:
    store = ModelStore(store_dir)
    for default in DEFAULT_MODELS:
        if store.versions(default.name):
            continue
        src = default.source_path()
        if src is None:
            sys.exit(f"{default.name}: needs the {default.package} package ({default.install})")
        task = discover().get(default.task)
        if task is None:
            sys.exit(f"{default.name} is a {default.task} model: no installed task serves it")
        print(f"exporting {default.name} ({precision}) from {src}", flush=True)
        await export_model(
            store,
            src,
            task=task,
            precision=precision,
            name=default.name,
            source_id=default.source_id,
            sampling=dict(default.sampling),
        )
    written = await export_archive(store, [StoreModel(d.name) for d in DEFAULT_MODELS], out)
    for ref, digest in written:
        print(f"{out}: {ref}@{digest}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out", type=Path)
    p.add_argument("--store", type=Path, default=None, help="a store that may hold the models already")
    p.add_argument("--precision", default="auto", help="as the daemon's default_precision (auto: per task)")
    args = p.parse_args()
    if args.store is not None:
        asyncio.run(build(args.out, args.store, args.precision))
        return
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(build(args.out, Path(tmp), args.precision))


if __name__ == "__main__":
    main()
