"""Data chores: index a corpus, simulate users, estimate position bias, export the JSON Schemas, read dead letters."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from services.cli.base import app, console, parse_when, settings, setup_process


@app.command()
def index(
    input: Path = typer.Option(None, "--input", help="a JSONL, CSV or Parquet file of documents (or a BEIR folder)"),
    dataset: str = typer.Option(None, help="a BEIR folder, indexed exactly (default without --input: the `dataset` setting)"),
    format: str = typer.Option(None, help="jsonl, csv or parquet (default: from the file's extension)"),
    id: str = typer.Option("id", help="the column holding a document's id"),
    text: str = typer.Option("text", help="the column holding its text"),
    title: str = typer.Option("title", help="the column holding its title (optional in each row)"),
    field: list[str] = typer.Option([], help="a filterable field, NAME or NAME:number (repeatable)"),
    vector: str = typer.Option(None, help="a column holding a precomputed 384-number vector (then no encoding)"),
    replace: bool = typer.Option(False, help="delete the indexed documents the file does not hold"),
) -> None:
    """Load documents into the living index: each row stored or refused with its reason, then
    encoded and indexed (by the running serving worker's indexer when one holds the index)."""
    from services.cli.progress import ProgressBar
    from training import beir
    from training.corpus.dense import current_snapshot, describe
    from training.corpus.files import Mapping, parse_field, read_rows
    from training.indexing import build_index, load_documents

    s = settings()
    setup_process(s)
    if input is None or input.is_dir():
        ds = beir.load(str(input) if input else dataset or s.dataset, s.state_dir / "datasets")
        with ProgressBar() as progress:
            folder = build_index(ds, s.state_dir, progress=progress)
        console.print(f"index of {len(ds.corpus)} documents ({ds.name}) at {folder}")
        console.print(describe(current_snapshot(folder)))
        return
    mapping = Mapping(id=id, text=text, title=title, fields=dict(parse_field(f) for f in field), vector=vector)
    with ProgressBar() as progress:
        rows = (mapping.document(row) for row in read_rows(input, format))
        report = load_documents(s.state_dir, rows, mapping.fields, replace=replace, progress=progress, ann=s.corpus.ann())
    console.print(f"stored {report.stored}, refused {report.refused}, deleted {report.deleted} documents from {input}")
    for row, doc_id, reason in report.refusals:
        console.print(f"  row {row}{f' ({doc_id})' if doc_id else ''}: {reason}")
    if report.refused > len(report.refusals):
        console.print(f"  ... and {report.refused - len(report.refusals)} more")
    console.print(describe(current_snapshot(s.state_dir / "index")))
    if report.applied_by:
        console.print(f"the serving worker's indexer (pid {report.applied_by}) makes them searchable within seconds")
    if report.refused and not report.stored:
        raise typer.Exit(1)


@app.command()
def corpus(last: int = typer.Option(10, min=0, help="audited changes to list, newest first")) -> None:
    """The living corpus: documents, the last change, declared fields, who indexes, who changed what."""
    import datetime as dt

    from training.corpus.bm25 import Lease
    from training.corpus.dense import current_snapshot, describe
    from training.indexing import LEASE_FILE, open_store
    from training.ranking.first_stage import index_folder

    s = settings()
    folder = index_folder(s.state_dir)
    store = open_store(s.state_dir)
    fields = ", ".join(f"{n} ({t.value})" for n, t in store.declared().items()) or "none"
    lease = Lease(folder / LEASE_FILE)
    indexer = "none running" if lease.acquire() else f"pid {lease.holder()}"
    lease.release()
    console.print(
        f"{store.count()} documents, change {store.head()} (BM25 has applied {store.applied('bm25')}); fields: {fields}"
    )
    console.print(f"indexer: {indexer}; {len(store.missing_vectors(100_000))} documents waiting to be encoded")
    console.print(describe(current_snapshot(folder)))
    table = Table("change", "at", "who", "what", "documents", "first ids")
    for row in store.audit(last):
        at = dt.datetime.fromtimestamp(row["at"]).isoformat(timespec="seconds")
        table.add_row(str(row["seq"]), at, row["actor"], row["action"], str(row["documents"]), ", ".join(row["ids"][:3]))
    if last:
        console.print(table)


@app.command()
def variant(
    kind: str = typer.Argument(
        "keyword-stuffed",
        help="keyword-stuffed: every document ends with words of random queries; "
        "subset: fewer queries and documents, for quick benchmark runs",
    ),
    out: Path = typer.Option(..., help="the new BEIR folder"),
    dataset: str = typer.Option(None, help="BEIR folder it starts from (default: the `dataset` setting)"),
    queries_per_doc: int = typer.Option(3, min=1, help="keyword-stuffed: queries whose words stuff each document"),
    queries: list[str] = typer.Option(["train=200", "test=100"], help="subset: SPLIT=N queries kept per split"),
    docs: int = typer.Option(1500, min=1, help="subset: documents kept (the kept queries' judged ones first)"),
    seed: int = 0,
) -> None:
    """A copy of a dataset made harder (one where a learned first-stage fusion must beat the fixed one) or smaller."""
    from schemas import InvalidInput
    from training import beir
    from training.variants import keyword_stuffed, subset

    if kind not in ("keyword-stuffed", "subset"):
        raise InvalidInput(f"unknown variant {kind!r}: there are keyword-stuffed and subset")
    s = settings()
    ds = beir.load(dataset or s.dataset, s.state_dir / "datasets")
    if kind == "keyword-stuffed":
        console.print(f"written: {keyword_stuffed(ds, out, queries_per_doc, seed)}")
        return
    per_split: dict[str, int] = {}
    for item in queries:
        split, _, n = item.partition("=")
        if not n.isdigit() or int(n) < 1:
            raise InvalidInput(f"--queries takes SPLIT=N with N >= 1, not {item!r}")
        per_split[split] = int(n)
    console.print(f"written: {subset(ds, out, per_split, docs, seed)}")


@app.command()
def simulate(
    dataset: str = typer.Option(None),
    split: str = "train",
    sessions: int = 200,
    seed: int = 0,
    url: str = typer.Option(None, help="serving worker URL (default from config)"),
    concurrency: int = typer.Option(4, help="simulated users at a time"),
) -> None:
    """Play simulated users against /rank and emit their interactions through the SDK."""
    from services.local.simulate import UserModel, app_client, examination_curve
    from services.local.simulate import simulate as run
    from training import beir

    s = settings()
    ds = beir.load(dataset or s.dataset, s.state_dir / "datasets")
    client = app_client(s, url)
    stats = run(client, ds, split, sessions, UserModel(examination_curve(s.clicklog)), seed, concurrency=concurrency)
    console.print(stats)


@app.command("export-schemas")
def export_schemas(out: Path = typer.Option(None)) -> None:
    """Write the JSON Schema files of every event type."""
    from schemas import export_json_schemas

    for p in export_json_schemas(out) if out else export_json_schemas():
        console.print(str(p))


@app.command()
def propensity(
    clicklog: Path = typer.Option(None, help="impressions.tsv.gz of a click log; default: the `clicklog` setting's"),
    from_kafka: bool = typer.Option(False, "--from-kafka", help="estimate from our own impressions and clicks on Kafka"),
    out: Path = typer.Option(Path("propensity.png"), help="where to write the plot"),
) -> None:
    """Estimate the examination curve (position bias) by EM on logged impressions and clicks."""
    from schemas import InvalidInput, NotFound
    from training.labels.rules import DEFAULT_EXAMINATION
    from training.plots import examination_curves
    from training.propensity import estimate_examination, read_click_log

    s = settings()
    try:
        if from_kafka:
            from services.control.scheduler import impression_click_log
            from services.storage import open_labels

            df, source = impression_click_log(s, open_labels(s.label_store_url)), f"Kafka at {s.kafka.address}"
            est = estimate_examination(df["query"], df["doc_id"], df["position"], df["clicked"])
        else:
            path = clicklog or s.clicklog / "impressions.tsv.gz"
            if not path.exists():
                raise NotFound(f"click log {path} not found: pass --clicklog or set RANKLOOP_CLICKLOG")
            df, source = read_click_log(path), str(path)
            est = estimate_examination(df.query_id, df.doc_id, df.position, df.clicked)
    except ValueError as e:
        raise InvalidInput(str(e)) from e
    t = Table("position", "estimated examination", "CTR prior (labelling default)")
    for i, v in enumerate(est.examination):
        t.add_row(str(i + 1), f"{v:.3f}", f"{DEFAULT_EXAMINATION[i]:.3f}" if i < len(DEFAULT_EXAMINATION) else "")
    console.print(t)
    console.print(f"{est.impressions} impressions from {source}, {est.iterations} EM iterations")
    examination_curves(
        {"EM estimate": est.examination, "CTR by position (normalised)": DEFAULT_EXAMINATION}, out, "examination by position"
    )
    console.print(f"plot: {out}")


@app.command("dead-letters")
def dead_letters(
    since: str = typer.Option(None, help="unix seconds or an ISO date (2026-11-21T10:00)"),
    request_id: str = typer.Option(None, help="only those about this request"),
    code: str = typer.Option(None, help="only this reject code, e.g. late_event"),
    key: str = typer.Option(None, help="only events this API key (by name) sent"),
    limit: int = typer.Option(50, min=1, help="newest N"),
) -> None:
    """The stream's dead letters, newest first, read from the dead-letter topic as `GET /dead-letters` reads it."""
    import time

    from services.dead_letters import NEWEST, DeadLetterQuery, KafkaDeadLetterLog, find_dead_letters

    s = settings()
    query = DeadLetterQuery(request_id=request_id, since=parse_when(since), code=code, api_key=key, limit=limit)
    found = find_dead_letters(KafkaDeadLetterLog(s.kafka.address, s.keys.dead_letters), query)
    t = Table("when (UTC)", "code", "reason")
    for d in found:
        t.add_row(time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(d.timestamp)), d.code.value, d.reason)
    console.print(t)
    console.print(f"{len(found)} shown, newest first (the last {NEWEST:,} of each partition of {s.keys.dead_letters} are read)")
