"""`python -m server models …`: import, list, show, sign, verify, evaluate, promote, rollback, bom.

Each command exits 1 with the reason on a refusal (a format policy violation, a failed verification, an
invalid state transition), never with a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from server.audit.service import Actor
from server.settings import Settings


@contextmanager
def _db(settings: Settings) -> Iterator[Any]:
    from server.storage.db import Database
    from server.storage.migrate import upgrade

    upgrade(settings.sqlalchemy_url)
    db = Database(settings.sqlalchemy_url)
    try:
        yield db
    finally:
        db.dispose()


def _print(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, default=str) if getattr(args, "json", False) else text)


def import_default(settings: Settings, args: argparse.Namespace) -> int:
    """Convert (once), import, sign and promote the embedded default model; print the active version."""
    from server.registry.loader import load_verified

    model = next((m for m in settings.models if m.path is None), None)
    if model is None:
        print("no configured model uses the embedded default; nothing to import", file=sys.stderr)
        return 0
    with _db(settings) as db:
        info = load_verified(settings, model, db, progress=not args.json).info
    out = {"name": info.name, "version": info.version, "digest": info.digest, "path": str(info.path)}
    # One line of JSON: scripts read the last line of this command's output.
    print(json.dumps(out) if args.json else f"{info.fingerprint} (signature verified) at {info.path}")
    return 0


def import_model(settings: Settings, args: argparse.Namespace) -> int:
    """Import a folder; with --convert-pickle its pickled weights are first scanned and converted to safetensors."""
    from server.registry import catalog
    from server.registry.loader import signer
    from server.registry.store import BlobStore

    provenance: dict[str, Any] = {
        k: v
        for k, v in {"source": str(args.folder), "dataset": args.dataset, "base_model": args.base_model}.items()
        if v
    }
    store = BlobStore(settings.data_dir)
    with ExitStack() as stack:
        folder = args.folder
        if args.convert_pickle:
            from server.registry.convert import converted_folder

            conversion = stack.enter_context(converted_folder(store, args.folder))
            folder, provenance["converted_from_pickle"] = conversion.folder, conversion.record
        with _db(settings) as db, db.session() as session:
            view = catalog.import_version(
                session, store, args.name, folder, provenance=provenance, signer=signer(settings), actor=Actor.system()
            )
    text = f"{view['name']} {view['version']} sha256:{view['digest']} ({view['state']})"
    converted = view["provenance"].get("converted_from_pickle")
    if converted:
        text += f", converted from {', '.join(p['name'] for p in converted['pickles'])}"
    _print(args, view, text)
    return 0


def list_models(settings: Settings, args: argparse.Namespace) -> int:
    from server.registry import catalog

    with _db(settings) as db, db.session() as session:
        rows = catalog.list_models(session)
    _print(args, rows, "\n".join(json.dumps(r, default=str) for r in rows))
    return 0


def show(settings: Settings, args: argparse.Namespace) -> int:
    from server.registry import catalog

    with _db(settings) as db, db.session() as session:
        view = catalog.show(session, args.name)
    _print(args, view, json.dumps(view, indent=2, default=str))
    return 0


def verify(settings: Settings, args: argparse.Namespace) -> int:
    from server.registry import catalog
    from server.registry.loader import trust
    from server.registry.store import BlobStore

    with _db(settings) as db, db.session() as session:
        manifest = catalog.verify_version(
            session,
            BlobStore(settings.data_dir),
            args.name,
            args.version,
            trust=trust(settings),
            actor=Actor.system(),
            path=args.path,
        )
    out = {
        "name": args.name,
        "digest": manifest.root,
        "signer": manifest.signer,
        "folder": str(manifest.folder),
        "files": len(manifest.files),
        "verified": True,
    }
    _print(args, out, f"OK: {manifest.folder} matches sha256:{manifest.root} signed by {manifest.signer}")
    return 0


def sign(settings: Settings, args: argparse.Namespace) -> int:
    from server.registry import catalog
    from server.registry.loader import signer
    from server.registry.store import BlobStore

    with _db(settings) as db, db.session() as session:
        view = catalog.sign_version(
            session, BlobStore(settings.data_dir), args.name, args.version, signer(settings), Actor.system()
        )
    _print(args, view, f"signed {view['name']} {view['version']} ({view['signer']})")
    return 0


def evaluate(settings: Settings, args: argparse.Namespace) -> int:
    """Run the pre-promotion suite on the version's verified stored bytes and record it; exit 1 unless passed.

    ``--results FILE`` records an operator's results instead, marked as such (``suite: null``): a local
    operator owns the data directory anyway; the admin API can only run the suite.
    """
    if (args.results is None and args.failed) or (args.results is not None and (args.suite or args.accept_drift)):
        print("error: --failed goes with --results; --suite and --accept-drift with a suite run", file=sys.stderr)
        return 2
    if args.results is not None:
        return _record_evaluation(settings, args)
    from server.registry.evaluation import evaluate_version
    from server.registry.loader import trust
    from server.registry.store import BlobStore

    with _db(settings) as db:
        view = evaluate_version(
            db,
            BlobStore(settings.data_dir),
            args.name,
            args.version,
            trust=trust(settings),
            settings=settings.registry.evaluation,
            actor=Actor.system(),
            suite_path=args.suite,
            accept_drift=args.accept_drift,
        )
    results = view["eval_results"]
    suite, verdict = results["suite"], "passed" if view["eval_passed"] else "FAILED"
    about = f"suite {suite['name']} sha256:{suite['sha256'][:12]}, {results['seconds']} s"
    lines = [f"{view['name']} {view['version']}: evaluation {verdict} ({about}), now {view['state']}"]
    lines += [f"  {failure}" for failure in results["failures"]]
    if results.get("drift", {}).get("status") == "accepted":
        lines.append(f"  drift against the active version accepted: mean JS {results['drift']['mean_js']} bits")
    _print(args, view, "\n".join(lines))
    return 0 if view["eval_passed"] else 1


def _record_evaluation(settings: Settings, args: argparse.Namespace) -> int:
    from server.registry import catalog

    try:
        supplied = json.loads(Path(args.results).read_text())
    except ValueError as exc:
        print(f"error: {args.results} is not JSON: {exc}", file=sys.stderr)
        return 1
    results = {
        "suite": None,
        "recorded": True,
        "note": "results supplied by a local operator with --results; the suite did not run",
        "supplied": supplied,
    }
    with _db(settings) as db, db.session() as session:
        view = catalog.record_evaluation(
            session, args.name, args.version, results, not args.failed, Actor.system(), recorded=True
        )
    _print(args, view, f"{view['name']} {view['version']}: {view['state']} (operator-supplied results; suite not run)")
    return 0


def promote(settings: Settings, args: argparse.Namespace) -> int:
    from server.registry import catalog

    with _db(settings) as db, db.session() as session:
        view = catalog.promote(session, args.name, args.version, Actor.system())
    _print(args, view, f"{view['name']} {view['version']} is active (restart or hot-swap to serve it)")
    return 0


def rollback(settings: Settings, args: argparse.Namespace) -> int:
    from server.registry import catalog

    with _db(settings) as db, db.session() as session:
        view = catalog.rollback(session, args.name, Actor.system())
    _print(args, view, f"{view['name']} rolled back to {view['version']}")
    return 0


def bom(settings: Settings, args: argparse.Namespace) -> int:
    from server.registry import catalog
    from server.registry.store import BlobStore

    with _db(settings) as db, db.session() as session:
        view = catalog.show(session, args.name)
    versions = {v["version"]: v for v in view.get("versions", [])}
    target = versions.get(args.version) if args.version else view.get("active")
    if not target:
        print(f"error: no such version of {args.name}", file=sys.stderr)
        return 1
    print(BlobStore(settings.data_dir).read_meta(target["digest"], "bom.json").decode())
    return 0


def run(func: Callable[[Settings, argparse.Namespace], int], settings: Settings, args: argparse.Namespace) -> int:
    from server.registry.catalog import RegistryError
    from server.registry.digest import UnsafeModelFolder
    from server.registry.format_policy import FormatRefused
    from server.registry.signing import VerificationFailed

    try:
        return func(settings, args)
    except (RegistryError, FormatRefused, UnsafeModelFolder, VerificationFailed, FileNotFoundError) as exc:
        print(f"error: {getattr(exc, 'reason', None) or exc}", file=sys.stderr)
        return 1


def add_commands(models_sub: argparse._SubParsersAction, bind: Callable[..., Any]) -> None:
    def add(name: str, func: Callable[..., int], text: str) -> argparse.ArgumentParser:
        p = models_sub.add_parser(name, help=text, description=text)
        p.set_defaults(func=bind(func))
        p.add_argument("--json", action="store_true", help="print as JSON")
        return p

    add("import-default", import_default, "convert the embedded default model once, import, sign and promote it")
    p = add("import", import_model, "import a local HF-format folder as a new signed, immutable version")
    p.add_argument("name")
    p.add_argument("folder", type=Path)
    p.add_argument("--dataset", help="training data provenance (recorded in the BOM)")
    p.add_argument("--base-model", help="base model provenance (recorded in the BOM)")
    p.add_argument(
        "--convert-pickle",
        action="store_true",
        help="convert pickled torch weights (.bin .pt .pth .ckpt .pkl) to safetensors: each file is scanned with "
        "fickling first (any finding refuses the import, nothing is loaded), then loaded with torch's weights-only "
        "unpickler; the safetensors are signed, the pickles are not stored, and the BOM records their SHA-256",
    )
    add("list", list_models, "list models and their versions")
    add("show", show, "one model: active version (digest, stored path) and all versions").add_argument("name")
    p = add(
        "verify",
        verify,
        "verify the active version (or --version) or another folder (--path) against "
        "its signature; exits 1 with the reason on any mismatch",
    )
    p.add_argument("name")
    p.add_argument("--version")
    p.add_argument("--path", type=Path)
    for name, func, text in (
        ("sign", sign, "re-sign a version and its BOM with the local key"),
        ("promote", promote, "make a version active (it must be evaluated)"),
    ):
        p = add(name, func, text)
        p.add_argument("name")
        p.add_argument("version")
    p = add(
        "evaluate",
        evaluate,
        "run the pre-promotion suite (canaries, backdoor-trigger probes, drift against the active version) "
        "on a version's signature-verified stored bytes and record the result; exits 1 unless it passed",
    )
    p.add_argument("name")
    p.add_argument("version")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--run", action="store_true", help="run the suite (the default)")
    mode.add_argument(
        "--results", type=Path, help="instead, record these operator-supplied results (JSON), marked as not a suite run"
    )
    p.add_argument("--failed", action="store_true", help="with --results: record them as failed")
    p.add_argument("--suite", type=Path, help="suite file (default: registry.evaluation.suite)")
    p.add_argument(
        "--accept-drift",
        action="store_true",
        help="after human review: accept drift past the suite's threshold (recorded with who accepted it)",
    )
    add("rollback", rollback, "move the active alias back to the previous version").add_argument("name")
    p = add("bom", bom, "print a version's CycloneDX 1.6 ML-BOM (default: the active version)")
    p.add_argument("name")
    p.add_argument("--version")
