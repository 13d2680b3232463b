"""`pagedq`: migrate, worker, flower, batch (through the queue), run (in-process), cancel,
serve and keys."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from worker.client import BrokerUnavailable
from worker.documents import DEFAULT_TEMPLATE, JobOptions, check_structure, check_template
from worker.migrate import SchemaOutOfDate
from worker.schemas import QueueKind
from worker.settings import Settings, SettingsError, load_settings


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        overrides = {"model": args.model} if getattr(args, "model", None) else {}
        settings = load_settings(**overrides)
        return args.command(settings, args) or 0
    except (SettingsError, SchemaOutOfDate, BrokerUnavailable, OSError) as exc:
        print(f"pagedq: {exc}", file=sys.stderr)
        return 2


def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    from worker.migrate import run_alembic

    if args.downgrade:
        run_alembic(settings.database_url, args.downgrade, downgrade=True)
    else:
        run_alembic(settings.database_url, args.revision)
    return 0


def _worker(settings: Settings, args: argparse.Namespace) -> int:
    from worker.bootstep import install
    from worker.celery_app import create_app

    app = create_app(settings)
    install(app)
    kinds = [QueueKind(kind) for kind in args.queues.split(",")]
    # The Redis transport takes queues in the order listed.
    queues = app.queue_names(kinds)
    argv = [
        "worker",
        # Threads, never prefork: the one engine lives in this process, and a
        # forked child could not use CUDA.
        "--pool=threads",
        f"--concurrency={args.concurrency or settings.concurrency}",
        f"--queues={','.join(queues)}",
        "--task-events",
        "--without-mingle",
        "--without-gossip",
        f"--loglevel={args.loglevel}",
    ]
    if args.hostname:
        argv.append(f"--hostname={args.hostname}")
    app.worker_main(argv)
    return app.exit_status


def _flower(settings: Settings, args: argparse.Namespace) -> int:
    from worker.flower import run_flower

    updates: dict[str, Any] = {}
    if args.address:
        updates["flower_address"] = args.address
    if args.port is not None:
        updates["flower_port"] = args.port
    return run_flower(settings.model_copy(update=updates)) or 0


def _job_options(args: argparse.Namespace) -> JobOptions:
    """How each line becomes a job; a structure option the engine would refuse is a
    SettingsError, before any line is read."""
    defaults = {name: value for name, value in
                (("max_tokens", args.max_tokens), ("temperature", args.temperature))
                if value is not None}
    for kind, value, option in (("json", args.json_schema, "--json-schema"),
                                ("regex", args.regex, "--regex"),
                                ("choice", args.choice, "--choice")):
        if value is not None:
            try:
                defaults["structured_outputs"] = check_structure({kind: value}, option)
            except ValueError as exc:
                raise SettingsError(str(exc)) from None
    return JobOptions(template=args.template, chat=args.chat, queue=QueueKind(args.queue),
                      priority=args.priority, defaults=defaults, ttl_s=args.ttl)


def _batch(settings: Settings, args: argparse.Namespace) -> int:
    from worker.bulk import QueueBackend, run_bulk
    from worker.client import Client

    options = _job_options(args)
    with Client(settings) as client:
        summary = run_bulk(args.docs, args.output, options, QueueBackend(client),
                           progress=not args.quiet)
    print(summary.table())
    return 0 if summary.all_succeeded else 1


def _run(settings: Settings, args: argparse.Namespace) -> int:
    from worker.bulk import LocalBackend, run_bulk
    from worker.engine_service import EngineService
    from worker.executor import JobRunner
    from worker.migrate import run_alembic
    from worker.store import JobStore

    options = _job_options(args)
    run_alembic(settings.database_url)  # the embedded database needs no separate step

    def build() -> Any:
        from engine import EngineConfig, LLMEngine

        return LLMEngine(EngineConfig(**settings.engine_kwargs()))

    service = EngineService(build)
    try:
        service.start()
    except ValueError as exc:  # the engine names the bad knob
        raise SettingsError(f"the engine refused its settings: {exc}") from exc
    store = JobStore.from_url(settings.database_url)
    runner = JobRunner(store, service, settings)
    try:
        summary = run_bulk(args.docs, args.output, options,
                           LocalBackend(runner, settings.concurrency), progress=not args.quiet)
    finally:
        service.stop(timeout=settings.job_deadline_s)
        runner.close()
        store.close()
    print(summary.table())
    return 0 if summary.all_succeeded else 1


def _cancel(settings: Settings, args: argparse.Namespace) -> int:
    from worker.bulk_batch import BulkBatches
    from worker.client import Client
    from worker.models import BatchStatus

    with Client(settings) as client:
        if args.batch is None:
            report = client.cancel_jobs(args.job_ids)
            for job_id in report.missing:
                print(f"pagedq: no job {job_id!r}", file=sys.stderr)
            print(f"{len(args.job_ids) - len(report.missing)} job(s): {report}")
            return 1 if report.missing else 0
        cancelled = client.cancel_batch(args.batch)
        if cancelled is None:
            print(f"pagedq: no batch {args.batch!r}", file=sys.stderr)
            return 1
        if cancelled.status is not BatchStatus.CANCELLING:
            print(f"batch {args.batch} is {cancelled.status.value}: nothing to cancel")
            return 0
        # A CLI batch with nothing left running ends now; the gateway ends its own.
        status = BulkBatches(client.store.engine).close(args.batch) or cancelled.status
    print(f"batch {args.batch} ({status.value}): {cancelled.report}")
    return 0


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from worker.gateway.app import create_app
    from worker.migrate import check_current
    from worker.store import JobStore

    store = JobStore.from_url(settings.database_url, pool_size=1)
    try:
        check_current(store.engine)  # the gateway's tables come with `pagedq migrate`
    finally:
        store.close()
    uvicorn.run(create_app(settings), host=args.host, port=args.port,
                log_level=args.loglevel)
    return 0


def _keys(settings: Settings, args: argparse.Namespace) -> int:
    from worker.keys import KeyProblem, KeyStore
    from worker.migrate import check_current

    keys = KeyStore(settings.database_url)
    try:
        check_current(keys.engine)
        if args.action == "create":
            info, key = keys.create(args.name)
            print(f"API key {info.name!r} ({info.id}); shown once, store it now:\n{key}")
        elif args.action == "revoke":
            keys.revoke(args.name)
            print(f"revoked {args.name!r}")
        else:
            for info in keys.list():
                state = "active" if info.active else f"revoked {info.revoked_at:%Y-%m-%d %H:%M}"
                print(f"{info.name}\t{info.prefix}...\t{info.created_at:%Y-%m-%d %H:%M}"
                      f"\t{state}")
    except KeyProblem as exc:
        print(f"pagedq: {exc}", file=sys.stderr)
        return 1
    finally:
        keys.close()
    return 0


def _template(text: str) -> str:
    # A shell or Makefile passes "\\n" through as two characters; mean a newline.
    text = text.replace("\\n", "\n").replace("\\t", "\t")
    try:
        return check_template(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _json_schema(path: str) -> Any:
    """The file's JSON; whether it is a schema is checked with the other structures."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:  # not JSON, or not UTF-8
        raise argparse.ArgumentTypeError(f"{path} is not JSON: {exc}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pagedq", description="LLM generation jobs: Celery on Redis, results in SQL.",
        epilog="Configuration comes from PAGEDQ_* environment variables (see the README).")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    p = commands.add_parser("migrate", help="bring the database schema up to date")
    p.add_argument("--revision", default="head", help="upgrade to this revision (default head)")
    p.add_argument("--downgrade", metavar="REVISION", help="downgrade to REVISION (e.g. base)")
    p.set_defaults(command=_migrate)

    p = commands.add_parser("worker", help="run a GPU worker: one engine, a threads pool")
    p.add_argument("--concurrency", type=int, help="job threads (default max_num_seqs)")
    p.add_argument("--queues", default="interactive,bulk",
                   help="queues to drain, interactive always first (default both)")
    p.add_argument("--hostname", help="Celery node name, e.g. gpu0@%%h")
    p.add_argument("--loglevel", default="info")
    p.add_argument("--model", help="override PAGEDQ_MODEL")
    p.set_defaults(command=_worker)

    p = commands.add_parser(
        "flower", help="run Flower on this broker, behind a login",
        description="Without PAGEDQ_FLOWER_PASSWORD a password is generated and printed.")
    p.add_argument("--address", help="override PAGEDQ_FLOWER_ADDRESS (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="override PAGEDQ_FLOWER_PORT (default 5555)")
    p.set_defaults(command=_flower)

    p = commands.add_parser("serve", help="run the OpenAI-compatible HTTP gateway")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--loglevel", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(command=_serve)

    p = commands.add_parser("keys", help="create, list or revoke the gateway's API keys")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (("create", "make a key; it is printed once"),
                         ("revoke", "disable a key at once")):
        actions.add_parser(action, help=text).add_argument("name", help="the key's name")
    actions.add_parser("list", help="every key: name, prefix, created, state")
    p.set_defaults(command=_keys)

    p = commands.add_parser(
        "cancel", help="cancel jobs, or every unfinished job of a batch",
        description="Queued jobs end cancelled at once; running ones are aborted by their "
                    "worker within a step; finished ones are left as they are.")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("job_ids", nargs="*", default=[], metavar="JOB_ID",
                        help="the jobs to cancel")
    target.add_argument("--batch", metavar="BATCH_ID",
                        help="a batch's id, as `pagedq batch` prints it or the gateway shows")
    p.set_defaults(command=_cancel)

    for name, func, help_text in (
        ("batch", _batch, "enqueue every document of a JSONL file, collect the results"),
        ("run", _run, "process a JSONL file in this process, no broker needed"),
    ):
        p = commands.add_parser(name, help=help_text)
        p.add_argument("docs", type=Path, help="input JSONL: id and prompt, or id and text")
        p.add_argument("-o", "--output", type=Path, required=True,
                       help="results JSONL; re-running resumes where it stopped")
        p.add_argument("--template", default=DEFAULT_TEMPLATE, type=_template,
                       help='prompt built from a line\'s fields, e.g. "Summarize: {text}"')
        p.add_argument("--chat", action="store_true",
                       help="wrap each prompt in the model's chat template")
        p.add_argument("--max-tokens", type=int, help="for lines without max_tokens")
        p.add_argument("--temperature", type=float, help="for lines without temperature")
        structure = p.add_mutually_exclusive_group()
        structure.add_argument("--json-schema", metavar="FILE", type=_json_schema,
                               help="constrain every output to this JSON schema")
        structure.add_argument("--regex", metavar="PATTERN",
                               help="constrain every output to match this regex")
        structure.add_argument("--choice", metavar="TEXT", action="append",
                               help="every output is one of these; repeat: --choice yes "
                                    "--choice no")
        p.add_argument("--priority", type=int, default=0, choices=range(10),
                       help="0 (first) to 9")
        p.add_argument("--queue", default=QueueKind.BULK.value,
                       choices=[kind.value for kind in QueueKind])
        p.add_argument("--ttl", type=_seconds, metavar="SECONDS",
                       help="a job not started this long after submission ends expired")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
        if name == "run":
            p.add_argument("--model", help="override PAGEDQ_MODEL")
        p.set_defaults(command=func)
    return parser


if __name__ == "__main__":
    sys.exit(main())
