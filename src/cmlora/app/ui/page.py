"""The page: Gradio Blocks wired to the form checks (``form``), the job runner (``jobs``) and the
allowed files (``files``). Layout and event wiring only; no generation logic and no checks of
its own, so what the page accepts is exactly what the core accepts within the server's caps.

Layout: the form on the left, and on the right, at the top, Generate/Cancel, the status (progress
per method with elapsed time and ETA, queue position, errors next to the button), the result cards
side by side and the session's gallery; below 700 px the two columns stack and Generate scrolls the
status into view.
"""

from __future__ import annotations

import html
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from ...errors import CmloraError
from ...methods import METHOD_LABELS
from .files import AllowedFiles
from .form import (
    LORA_COLUMNS,
    Form,
    Limits,
    ModelDefaults,
    build_requests,
    form_from_record,
    read_record_upload,
)
from .help import FIELD_HELP, METRIC_HELP, method_help_markdown, metric_help_markdown
from .jobs import Job, Result, Runner, new_token, valid_token

POLL_SECONDS = 0.2
CSS = """
#status { min-height: 3.5em; }
.cm-status { font-size: 0.95em; }
.cm-status[data-state=error] .cm-line { color: #b42318; font-weight: 600; }
.cm-method { display: grid; grid-template-columns: 9em 1fr 14em; gap: 0.5em; align-items: center; }
.cm-method progress { width: 100%; }
#cards { flex-wrap: wrap; gap: 0.5em; }
#cards > .card { flex: 1 1 200px; min-width: 180px; }
.card-info p { margin: 0.15em 0; font-size: 0.9em; }
.legend p { font-size: 0.8em; opacity: 0.8; }
@media (max-width: 700px) {
  .cm-method { grid-template-columns: 7em 1fr; }
  .cm-method .cm-time { grid-column: 1 / span 2; }
}
"""
#: Runs in the browser before the job is sent: on a phone the status is below the form.
SCROLL_JS = (
    "(...args) => { document.getElementById('status')?.scrollIntoView({block: 'nearest'}); return args; }"
)


@dataclass
class UIContext:
    """What the page needs from the server: model, allowed files, runner, caps and defaults."""

    base: Any
    files: AllowedFiles
    runner: Runner
    defaults: ModelDefaults
    limits: Limits
    note: str = ""


def model_defaults(base: Any) -> ModelDefaults:
    """Sensible starting values for a loaded model: its native size, its guidance and prompts; few
    steps on the small built-in models (they converge fast), 30 on a real one."""
    pipe = base.pipe
    size = int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))
    small = base.name in ("mini", "tiny-sd15", "tiny-sdxl")
    return ModelDefaults(
        size=size,
        steps=20 if small else 30,
        guidance=float(base.guidance),
        prompt=base.base_prompt or "",
        negative_prompt=base.negative_prompt or "",
    )


# --------------------------------------------------------------------------- rendering


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f} s"


def status_html(
    ctx: UIContext, snapshot: dict[str, Any] | None, message: str = "", state: str = "idle"
) -> str:
    """The status block: one line for the job, then one row per method (bar, steps, time, ETA)."""
    if snapshot is None:
        text = html.escape(message or "Pick LoRAs and methods, then Generate.")
        return f'<div class="cm-status" data-state="{state}"><div class="cm-line">{text}</div></div>'
    now = time.monotonic()
    job_state = snapshot["state"]
    end = snapshot["finished"] or now
    if job_state == "queued":
        ahead = snapshot.get("ahead", 0)
        line = f"Waiting: {ahead} job{'s' if ahead != 1 else ''} of other sessions ahead"
    elif job_state == "running":
        line = f"Running · {_seconds(end - snapshot['started'])} elapsed"
    elif job_state == "done":
        line = f"Done in {_seconds(end - (snapshot['started'] or end))}"
    elif job_state == "cancelled":
        line = f"Cancelled · {len(snapshot['results'])} of {len(snapshot['progress'])} images made"
    else:
        line = f"Error: {snapshot['error']}"
    if message:
        line = f"{message} · {line}"
    rows = []
    for p in snapshot["progress"]:
        eta = p.eta(now)
        timing = f"{p.step}/{p.total} steps · {_seconds(p.elapsed(now))}"
        if eta is not None:
            timing += f" · ETA {_seconds(eta)}"
        elif p.state in ("queued", "cancelled", "stopped"):
            timing += f" · {p.state}"
        rows.append(
            f'<div class="cm-method" data-label="{html.escape(p.label)}" data-state="{p.state}">'
            f"<span>{html.escape(p.label)}</span>"
            f'<progress max="{p.total}" value="{p.step}"></progress>'
            f'<span class="cm-time">{timing}</span></div>'
        )
    return (
        f'<div class="cm-status" data-state="{job_state}" data-job="{snapshot["id"]}">'
        f'<div class="cm-line">{html.escape(line)}</div>{"".join(rows)}</div>'
    )


def card_markdown(result: Result) -> str:
    """A result card's text: what made the image (seed, settings) and what it cost."""
    r = result.record
    options = {k: v for k, v in (r["options"] or {}).items() if v is not None}
    settings = ", ".join(f"{k}={json.dumps(v)}" for k, v in options.items())
    if len(settings) > 220:
        settings = settings[:217] + "..."
    return (
        f"**{r['method_label']}** · seed {r['seed']} · {r['width']}×{r['height']} · {r['steps']} steps · "
        f"guidance {r['guidance_scale']:g}\n\n"
        f"settings: {settings or 'defaults'}\n\n"
        f'<span title="{html.escape(METRIC_HELP["full calls"])}">{r["full_calls"]} full</span> + '
        f'<span title="{html.escape(METRIC_HELP["cached calls"])}">{r["cached_calls"]} cached</span> UNet calls · '
        f'<span title="{html.escape(METRIC_HELP["GMAC"])}">{r["macs"] / 1e9:.2f} GMAC</span> · '
        f'<span title="{html.escape(METRIC_HELP["seconds"])}">{r["seconds"]:.2f} s</span>'
    )


def gallery_items(ctx: UIContext, token: str) -> list[tuple[str, str]]:
    return [(str(r.png), r.caption) for r in ctx.runner.history(token)]


# --------------------------------------------------------------------------- the page


def build_page(ctx: UIContext):
    """The ``gr.Blocks`` of the app (not launched: ``serve`` does that behind the guard)."""
    import gradio as gr

    catalog = ctx.files.loras()
    slots = ctx.limits.methods
    d = ctx.defaults
    with gr.Blocks(title="cmlora", analytics_enabled=False, delete_cache=(1800, 3 * 3600)) as demo:
        token = gr.BrowserState(None, storage_key="cmlora-ui-session")
        gr.Markdown(
            f"### cmlora · training-free multi-LoRA composition · model **{html.escape(ctx.base.name)}**"
            + (f"\n\n{html.escape(ctx.note)}" if ctx.note else "")
        )
        with gr.Row(equal_height=False, elem_id="main"):
            with gr.Column(scale=2, min_width=340, elem_id="form"):
                loras = gr.Dropdown(
                    choices=[(e.label, name) for name, e in catalog.items()],
                    value=[],
                    multiselect=True,
                    label="LoRAs",
                    info=FIELD_HELP["loras"],
                    elem_id="loras",
                    max_choices=ctx.limits.loras,
                )
                table = gr.Dataframe(
                    headers=list(LORA_COLUMNS),
                    datatype=["str", "number", "str", "number"],
                    type="array",
                    column_count=(4, "fixed"),
                    row_count=(0, "dynamic"),
                    interactive=True,
                    label="Weight, category and order per LoRA",
                    elem_id="lora-table",
                    static_columns=[0],
                )
                gr.Markdown(FIELD_HELP["table"], elem_classes="legend")
                prompt = gr.Textbox(
                    value=d.prompt,
                    label="Prompt",
                    lines=2,
                    max_length=ctx.limits.prompt_chars,
                    elem_id="prompt",
                )
                methods = gr.CheckboxGroup(
                    choices=list(METHOD_LABELS),
                    value=list(d.methods),
                    label=f"Methods, side by side (up to {slots})",
                    elem_id="methods",
                )
                with gr.Accordion("What the methods do", open=False):
                    gr.Markdown(method_help_markdown(METHOD_LABELS))
                with gr.Row(equal_height=True):
                    seed = gr.Number(0, label="Seed", precision=0, minimum=0, elem_id="seed", min_width=100)
                    dice = gr.Button("Random seed", elem_id="random-seed", min_width=100, scale=0)
                with gr.Row():
                    steps = gr.Number(
                        d.steps,
                        label="Steps",
                        precision=0,
                        minimum=1,
                        maximum=ctx.limits.steps,
                        elem_id="steps",
                        min_width=80,
                    )
                    width = gr.Number(
                        d.size, label="Width", precision=0, minimum=8, step=8, elem_id="width", min_width=80
                    )
                    height = gr.Number(
                        d.size, label="Height", precision=0, minimum=8, step=8, elem_id="height", min_width=80
                    )
                with gr.Accordion("More settings", open=False):
                    negative = gr.Textbox(
                        value=d.negative_prompt,
                        label="Negative prompt",
                        max_length=ctx.limits.prompt_chars,
                        elem_id="negative",
                    )
                    with gr.Row():
                        guidance = gr.Number(
                            d.guidance, label="Guidance", info=FIELD_HELP["guidance"], elem_id="guidance"
                        )
                        lora_scale = gr.Number(
                            1.0, label="LoRA scale", info=FIELD_HELP["lora_scale"], elem_id="lora-scale"
                        )
                    profile = gr.Dropdown(
                        choices=[("model default", "")] + ctx.files.profiles(),
                        value="",
                        label="Profile",
                        info=FIELD_HELP["profile"],
                        elem_id="profile",
                    )
                    options = gr.Textbox(
                        "",
                        label="Method options (JSON)",
                        info=FIELD_HELP["options"],
                        elem_id="options",
                        max_length=ctx.limits.options_chars,
                    )
                    upload = gr.File(
                        label="Upload a LoRA (.safetensors) or a profile (.json)",
                        file_types=[".safetensors", ".json"],
                        type="filepath",
                        elem_id="upload",
                    )
            with gr.Column(scale=3, min_width=340, elem_id="output"):
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate", scale=3)
                    cancel = gr.Button("Cancel", variant="stop", elem_id="cancel", scale=1)
                status = gr.HTML(status_html(ctx, None), elem_id="status")
                columns, images, infos, downloads = [], [], [], []
                with gr.Row(elem_id="cards", equal_height=False):
                    for k in range(slots):
                        with gr.Column(
                            visible=False, min_width=180, elem_classes="card", elem_id=f"card-{k}"
                        ) as col:
                            images.append(
                                gr.Image(
                                    type="filepath",
                                    format="png",
                                    interactive=False,
                                    show_label=True,
                                    label=f"method {k + 1}",
                                    buttons=["download", "fullscreen"],
                                    height=220,
                                    elem_id=f"card-image-{k}",
                                )
                            )
                            infos.append(gr.Markdown("", elem_classes="card-info", elem_id=f"card-info-{k}"))
                            downloads.append(
                                gr.DownloadButton(
                                    "Download PNG + record", elem_id=f"card-download-{k}", size="sm"
                                )
                            )
                        columns.append(col)
                gr.Markdown(metric_help_markdown(), elem_classes="legend")
                history = gr.Gallery(
                    label="This session's images (newest first)",
                    columns=8,
                    height=200,
                    object_fit="contain",
                    format="png",
                    elem_id="history",
                    interactive=False,
                )
                load_record = gr.File(
                    label="Load a record back into the form: a cmlora PNG or its .json",
                    file_types=[".png", ".json"],
                    type="filepath",
                    elem_id="load-record",
                )

        card_outputs = [*columns, *images, *infos, *downloads]

        # ---------------------------------------------------------------- handlers

        def cards(snapshot: dict[str, Any] | None) -> list[Any]:
            """Card updates: one visible card per method of the job, filled as its image arrives."""
            progress = snapshot["progress"] if snapshot else []
            results = {r.label: r for r in snapshot["results"]} if snapshot else {}
            cols, imgs, texts, files = [], [], [], []
            for k in range(slots):
                p = progress[k] if k < len(progress) else None
                r = results.get(p.label) if p else None
                cols.append(gr.Column(visible=p is not None))
                imgs.append(
                    gr.Image(value=str(r.png) if r else None, label=p.label if p else f"method {k + 1}")
                )
                texts.append(card_markdown(r) if r else (f"**{p.label}** · {p.state}" if p else ""))
                files.append(gr.DownloadButton(value=str(r.png) if r else None, interactive=r is not None))
            return [*cols, *imgs, *texts, *files]

        def follow(token_value: str | None, job: Job | None, message: str, progress: Any):
            """Yield page updates while ``job`` waits and runs, then its final state and the gallery."""
            if job is None:
                return
            seen: tuple | None = None
            n_results = -1
            while True:
                snap = ctx.runner.snapshot(job)
                snap["ahead"] = ctx.runner.jobs_ahead(job) if snap["state"] == "queued" else 0
                done = sum(p.step for p in snap["progress"])
                total = sum(p.total for p in snap["progress"])
                running = next((p for p in snap["progress"] if p.state == "running"), None)
                if progress is not None and running is not None:
                    progress(
                        (done, total),
                        desc=f"{running.label}: step {running.step}/{running.total}",
                        unit="steps",
                    )
                key = (snap["state"], done, len(snap["results"]), round(time.monotonic(), 0))
                finished = snap["state"] in ("done", "cancelled", "error")
                if key != seen or finished:
                    seen = key
                    card_values = (
                        cards(snap)
                        if len(snap["results"]) != n_results or finished
                        else [gr.skip()] * len(card_outputs)
                    )
                    n_results = len(snap["results"])
                    gallery = gallery_items(ctx, token_value) if finished else gr.skip()
                    yield [status_html(ctx, snap, message), *card_values, gallery]
                if finished:
                    return
                time.sleep(POLL_SECONDS)

        def run(token_value, rows, prompt_v, negative_v, methods_v, seed_v, steps_v, width_v, height_v,
                guidance_v, scale_v, profile_v, options_v, progress=gr.Progress()):  # noqa: B008  # fmt: skip
            skip = [gr.skip()] * len(card_outputs)
            if not valid_token(token_value):
                yield [
                    status_html(ctx, None, "This page has no session yet: reload it.", "error"),
                    *skip,
                    gr.skip(),
                ]
                return
            order = {label: k for k, label in enumerate(METHOD_LABELS)}  # the picker's order, not the clicks'
            methods_v = sorted(methods_v or [], key=lambda m: order.get(m, len(order)))
            form = Form(rows or [], prompt_v, negative_v, methods_v, seed_v, steps_v, width_v, height_v,
                        guidance_v, scale_v, profile_v or None, options_v)  # fmt: skip
            try:
                job = ctx.runner.submit(token_value, build_requests(form, ctx.files, ctx.base, d, ctx.limits))
            except CmloraError as exc:
                yield [status_html(ctx, None, str(exc), "error"), *skip, gr.skip()]
                return
            yield from follow(token_value, job, "", progress)

        def on_load(token_value):
            if not valid_token(token_value):
                token_value = new_token()
            job = ctx.runner.job(token_value)
            snap = ctx.runner.snapshot(job) if job else None
            message = "Job of this session" if job else ""
            return [
                token_value,
                status_html(ctx, snap, message),
                *cards(snap),
                gallery_items(ctx, token_value),
            ]

        def follow_after_load(token_value):
            job = ctx.runner.job(token_value) if valid_token(token_value) else None
            if job is None or job.finished_state:
                # a generator that yields nothing would blank every output: keep what on_load showed
                yield [gr.skip()] * (2 + len(card_outputs))
                return
            yield from follow(token_value, job, "Job of this session (from before the reload)", None)

        def on_cancel(token_value):
            job = ctx.runner.cancel(token_value) if valid_token(token_value) else None
            if job is None:
                return status_html(ctx, None, "Nothing to cancel.")
            return gr.skip()

        def on_pick(names, rows):
            """Rows for the picked LoRAs (weights kept for those already there) and their triggers
            added to the prompt."""
            names = list(names or [])
            catalog_now = ctx.files.loras()
            old = {str(r[0]): r for r in (rows or []) if r and r[0]}
            new_rows = []
            for k, name in enumerate(names):
                entry = catalog_now.get(name)
                if name in old:
                    new_rows.append([name, old[name][1], old[name][2], k + 1])
                else:
                    new_rows.append([name, 1.0, (entry.category if entry else "") or "", k + 1])
            return new_rows, [n for n in names if n not in old]

        def on_pick_event(names, rows, prompt_value):
            new_rows, added = on_pick(names, rows)
            catalog_now = ctx.files.loras()
            text = prompt_value or ""
            for name in added:
                entry = catalog_now.get(name)
                if entry and entry.triggers and entry.triggers[0] not in text:
                    text = ", ".join(part for part in (text.strip(), ", ".join(entry.triggers)) if part)
            return new_rows, text

        def on_upload(path, names):
            if not path:
                return gr.skip(), gr.skip(), gr.skip(), None
            from pathlib import Path

            try:
                stored = ctx.files.add_upload(path, Path(path).name)
            except CmloraError as exc:
                return gr.skip(), gr.skip(), status_html(ctx, None, str(exc), "error"), None
            choices = [(e.label, n) for n, e in ctx.files.loras().items()]
            return (
                gr.Dropdown(choices=choices, value=list(names or [])),
                gr.Dropdown(choices=[("model default", "")] + ctx.files.profiles()),
                status_html(ctx, None, f"Uploaded {stored}: pick it above."),
                None,
            )

        # the settings that both a run reads and a loaded record fills in, in one order
        settings = [table, prompt, negative, methods, seed, steps, width, height, guidance, lora_scale]
        # what loading a record fills in (its order is on_record's return order), then the status
        record_fields = [loras, *settings, options, profile]

        def on_record(path):
            if not path:
                return [gr.skip()] * len(record_fields) + [gr.skip()]
            try:
                record = read_record_upload(path)
                form = form_from_record(record, ctx.files)
            except CmloraError as exc:
                return [gr.skip()] * len(record_fields) + [status_html(ctx, None, str(exc), "error")]
            choices = [(e.label, n) for n, e in ctx.files.loras().items()]
            message = (
                f"Loaded the record of {form.methods[0]} · seed {form.seed}: press Generate to make it again."
            )
            return [
                gr.Dropdown(choices=choices, value=[row[0] for row in form.rows]),
                form.rows,
                form.prompt,
                form.negative_prompt,
                form.methods,
                form.seed,
                form.steps,
                form.width,
                form.height,
                form.guidance,
                form.lora_scale,
                form.options,
                "",
                status_html(ctx, None, message, "loaded"),
            ]

        inputs = [token, *settings, profile, options]
        outputs = [status, *card_outputs, history]
        generate.click(
            run,
            inputs,
            outputs,
            js=SCROLL_JS,
            concurrency_limit=1,
            concurrency_id="generate",
            show_progress="full",
            show_progress_on=[status],
            api_name="generate",
        )
        cancel.click(on_cancel, [token], [status], queue=False, show_progress="hidden", api_name="cancel")
        dice.click(lambda: secrets.randbelow(2**32), None, [seed], queue=False, show_progress="hidden")
        loras.input(
            on_pick_event, [loras, table, prompt], [table, prompt], queue=False, show_progress="hidden"
        )
        upload.upload(on_upload, [upload, loras], [loras, profile, status, upload], show_progress="hidden")
        load_record.upload(
            on_record,
            [load_record],
            [*record_fields, status],
            show_progress="hidden",
        )
        demo.load(on_load, [token], [token, status, *card_outputs, history], show_progress="hidden").then(
            follow_after_load, [token], outputs, concurrency_limit=None, show_progress="hidden"
        )
    return demo


__all__ = ["CSS", "UIContext", "build_page", "model_defaults", "status_html"]
