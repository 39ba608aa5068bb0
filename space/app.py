"""hubmerge Space: build, check, run and publish a model merge from the browser.

The form is generated from the plugin registry (``hubmerge.plugins.registered_methods``): every
installed method appears with its summary, paper and typed parameter widgets (see
``space_form.widget_specs``), so a newly installed method plugin shows up without touching the Space.
The jobs (validate, merge, push) are calls into the hubmerge library (``space_jobs``); this file
is the Gradio layout and the wiring only.

Run it with ``python app.py`` (Spaces do), ``hubmerge space``, or ``build_app()`` in tests. The Hub
is ``HF_ENDPOINT`` as ``huggingface_hub`` read it at import: set it before starting the process
to use the loopback Hub (``hubmerge hub serve``).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the Space's own modules sit beside this file
    sys.path.insert(0, str(HERE))

import gradio as gr
import space_form as sf
import space_jobs as sj

logger = logging.getLogger("hubmerge.space")
TITLE = "hubmerge — merge fine-tuned models"
JOB_CONCURRENCY_ID = "hubmerge-job"
CSS = """
.hm-invalid { box-shadow: inset 0 0 0 2px #dc2626 !important; background: #fef2f2 !important;
               border-radius: 8px; }
.hm-invalid .info-text { color: #b91c1c !important; font-weight: 600; }
#hm-status { min-height: 3em; }
#hm-progress { min-height: 4.5em; }
#hm-status .prose p { margin: 0.2em 0; }
#hm-method-info { font-size: 0.95em; }
#hm-card table { display: block; overflow-x: auto; font-size: 0.85em; }
#hm-card td, #hm-card th, #hm-card td code { white-space: nowrap; }
.hm-step { margin-top: 0.6em !important; }
"""
INTRO = """# hubmerge — merge fine-tuned models into one

Combine models that were fine-tuned from the **same base model** (full fine-tunes or LoRA/IA3
adapters) into a single model, without writing code. **1** name the base and the experts,
**2** pick a merge method, **3** press **Check**, **Merge**, then **Push to Hub**.
"""


def default_recipes_dir() -> Path | None:
    """``HUBMERGE_SPACE_RECIPES``, else ``recipes/`` beside the Space, else the repository's ``recipes/``."""
    env = os.environ.get("HUBMERGE_SPACE_RECIPES")
    if env:
        return Path(env)
    for candidate in (HERE / "recipes", HERE.parent / "recipes"):
        if candidate.is_dir():
            return candidate
    return None


def _short(text: str, limit: int = 70) -> str:
    text = text.split(". ")[0].rstrip(".")
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _param_widget(spec: sf.WidgetSpec, value: Any, key: tuple) -> gr.components.Component:
    """One parameter's widget; ``key`` keeps what the visitor typed if the same form is rendered again."""
    common = {
        "label": spec.label,
        "info": spec.info,
        "elem_id": f"hm-param-{spec.name}",
        "interactive": True,
        "key": key,
    }
    if spec.kind == "slider":
        low, high = float(spec.minimum), float(spec.maximum)
        start = low if value is None else value
        return gr.Slider(minimum=low, maximum=high, step=spec.step, value=start, **common)
    if spec.kind in ("number", "integer"):
        return gr.Number(value=value, precision=0 if spec.kind == "integer" else None, **common)
    if spec.kind == "checkbox":
        return gr.Checkbox(value=bool(value), **common)
    if spec.kind == "dropdown":
        choices = [str(c) for c in spec.choices or ()]
        return gr.Dropdown(choices=choices, value=None if value is None else str(value), **common)
    placeholder = {"numbers": "e.g. 0.5, 0.5", "mapping": "e.g. scale: 0.3", "strings": "e.g. a, b"}.get(
        spec.kind, ""
    )
    return gr.Textbox(value="" if value is None else str(value), placeholder=placeholder, lines=1, **common)


def _status(kind: str, text: str) -> str:
    if kind == "busy":
        return f"**Working:** {text}"
    icon = {"ok": "✔", "error": "✖", "info": "ℹ"}[kind]
    return f"{icon} {text}"


def _guarded(status: gr.components.Component, hide: gr.components.Component | None = None):
    """Decorate an event handler so that an unexpected failure shows one line in ``status``, not a traceback.

    Args:
        status: Where the line goes.
        hide: A component to hide whatever happens (the progress box of a job).
    """

    def failed(fn, exc: Exception) -> dict:
        logger.exception("the Space's %s handler failed", fn.__name__)  # the server log keeps the traceback
        return {status: _status("error", f"**Something went wrong:** {sj.one_line(exc)}")}

    def decorate(fn):
        if inspect.isgeneratorfunction(fn):

            @functools.wraps(fn)  # keeps the signature: Gradio finds the ``gr.Progress`` parameter through it
            def stream(*args, **kwargs):
                out: dict = {}
                try:
                    for out in fn(*args, **kwargs):
                        yield out
                except Exception as exc:  # noqa: BLE001 - the visitor gets one line
                    out = failed(fn, exc)
                    yield out
                if hide is not None:
                    yield {**out, hide: gr.update(visible=False)}

            return stream

        @functools.wraps(fn)
        def handler(*args, **kwargs):
            try:
                out = fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - the visitor gets one line
                out = failed(fn, exc)
            if hide is not None:
                out[hide] = gr.update(visible=False)
            return out

        return handler

    return decorate


def _errors_markdown(errors: list[sf.FieldError]) -> str:
    lines = ["✖ **Please fix the highlighted field" + ("s" if len(errors) > 1 else "") + ":**", ""]
    lines += [f"- {e.message}" for e in errors]
    return "\n".join(lines)


def build_app(*, settings: sj.Settings | None = None, recipes_dir: Path | None = None) -> gr.Blocks:
    """Build the Space's Gradio app (not launched).

    Args:
        settings: Work directory and token policy (default: a temporary directory, typed tokens only).
        recipes_dir: Where example recipes are listed from (default: :func:`default_recipes_dir`).

    Returns:
        The ``gr.Blocks``; launch it with :func:`launch` (which adds the stylesheet and the queue).
    """
    from hubmerge.plugins import registered_methods

    settings = settings or sj.Settings()
    settings.workdir.mkdir(parents=True, exist_ok=True)
    methods = sf.method_infos(registered_methods())
    if not methods:
        raise RuntimeError("no merge method is installed (is hubmerge installed with its plugins?)")
    default_method = "task_arithmetic" if "task_arithmetic" in methods else next(iter(methods))
    recipes_dir = recipes_dir if recipes_dir is not None else default_recipes_dir()
    recipe_files = sf.list_recipe_files(recipes_dir)
    recipe_choices = [p.relative_to(recipes_dir).as_posix() for p in recipe_files] if recipes_dir else []
    has_flexmerge = sj.flexmerge_available()

    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 24 * 3600)) as app:
        gr.Markdown(INTRO)
        with gr.Row(equal_height=False):
            # ---------------------------------------------------------------- the form
            with gr.Column(scale=6):
                with gr.Accordion("Start from an example recipe", open=False, visible=bool(recipe_choices)):
                    with gr.Row():
                        recipe_dd = gr.Dropdown(
                            choices=recipe_choices,
                            value=None,
                            label="Recipe file",
                            info=f"YAML recipes found in {recipes_dir.name if recipes_dir else '-'}/",
                            scale=4,
                            elem_id="hm-recipe-file",
                        )
                        load_btn = gr.Button("Load into the form", scale=1, elem_id="hm-load")
                    load_note = gr.Markdown()
                gr.Markdown("### 1 · Models", elem_classes="hm-step")
                base = gr.Textbox(
                    label="Base model",
                    placeholder="organisation/base-model  or  organisation/base-model@revision",
                    info="The Hub repo the experts were fine-tuned from. Add @branch, @tag or @commit to pin "
                    "a revision; a huggingface.co link works too.",
                    elem_id="hm-base",
                    interactive=True,
                )
                experts = gr.Textbox(
                    label="Experts (one per line)",
                    lines=3,
                    max_lines=12,
                    placeholder="organisation/expert-a\norganisation/lora-adapter-b@v1.0",
                    info="Fine-tuned models or LoRA / IA3 / DoRA adapters of the base, one Hub repo per line "
                    "(adapters are recognised automatically).",
                    elem_id="hm-experts",
                    interactive=True,
                )
                gr.Markdown("### 2 · Method", elem_classes="hm-step")
                method_dd = gr.Dropdown(
                    choices=[(f"{n} — {_short(m.summary)}", n) for n, m in methods.items()],
                    value=default_method,
                    label="Merge method",
                    info="How the experts are combined; the parameters below follow the method.",
                    elem_id="hm-method",
                    interactive=True,
                )
                method_md = gr.Markdown(methods[default_method].markdown(), elem_id="hm-method-info")
                seed = gr.State({"method": default_method, "values": {}, "nonce": 0})
                with gr.Group(elem_id="hm-params"):  # the method's parameter widgets, rebuilt per method
                    gr.render(inputs=[seed], triggers=[seed.change, app.load])(
                        lambda current: render_params(current)
                    )
                flex_sizes = gr.Textbox(
                    label="FlexMerge sizes (optional)",
                    placeholder="all   or   1, 2, 1.5",
                    info="Leave empty for one merged model. Otherwise FlexMerge writes one deployment per "
                    "size, from 1 (one merged model) to the number of experts (every expert kept); the "
                    "method above merges inside each group.",
                    visible=has_flexmerge,
                    elem_id="hm-flex-sizes",
                    interactive=True,
                )
                with gr.Accordion("Advanced: precision", open=False), gr.Row():
                    dtype_dd = gr.Dropdown(
                        choices=list(sf.DTYPE_CHOICES),
                        value="float32",
                        label="Compute precision",
                        info="float32 is safest.",
                        elem_id="hm-dtype",
                        interactive=True,
                    )
                    out_dtype_dd = gr.Dropdown(
                        choices=[("same as the base model", "")]
                        + [(d, d) for d in sf.OUTPUT_DTYPE_CHOICES if d],
                        value="",
                        label="Output precision",
                        info="Saved weights' dtype.",
                        elem_id="hm-output-dtype",
                        interactive=True,
                    )
                gr.Markdown("### 3 · Publish", elem_classes="hm-step")
                with gr.Row():
                    output_repo = gr.Textbox(
                        label="Output repo",
                        placeholder="your-name/my-merge",
                        scale=3,
                        info="Where to publish; a name alone goes to your own account.",
                        elem_id="hm-output-repo",
                        interactive=True,
                    )
                    private = gr.Checkbox(
                        label="Private repo", value=False, scale=1, elem_id="hm-private", interactive=True
                    )
                description = gr.Textbox(
                    label="Description for the model card (optional)",
                    lines=2,
                    placeholder="What is this merge good for?",
                    elem_id="hm-description",
                    interactive=True,
                )
                token = gr.Textbox(
                    label="Hugging Face token",
                    type="password",
                    placeholder="hf_…",
                    info="Needed to push (write access) and to read private or gated models: "
                    f"{sj.TOKEN_URL}. Used for this request only; never stored, logged or put in the card.",
                    elem_id="hm-token",
                    interactive=True,
                )
            # ---------------------------------------------------------------- actions and results
            with gr.Column(scale=5):
                with gr.Row():
                    validate_btn = gr.Button("✔ Check", elem_id="hm-validate")
                    merge_btn = gr.Button("▶ Merge", variant="primary", elem_id="hm-merge")
                    push_btn = gr.Button("⬆ Push to Hub", interactive=False, elem_id="hm-push")
                status = gr.Markdown(
                    _status("info", "Fill in the form, then press **Check**."), elem_id="hm-status"
                )
                # the running job's progress bar, apart from the status so that both stay readable
                progress_box = gr.Markdown("", visible=False, elem_id="hm-progress")
                with gr.Tabs(selected="yaml") as tabs:
                    with gr.Tab("Recipe", id="yaml"):
                        yaml_code = gr.Code(
                            label="Recipe (YAML)", language="yaml", interactive=False, elem_id="hm-yaml"
                        )
                        download_btn = gr.DownloadButton(
                            "⬇ Download recipe YAML",
                            value=None,
                            interactive=False,
                            size="sm",
                            elem_id="hm-download",
                        )
                    with gr.Tab("Model card", id="card"):
                        card_md = gr.Markdown(
                            "*The model card appears here after a merge.*", elem_id="hm-card"
                        )
                    with gr.Tab("Output files", id="files"):
                        files_md = gr.Markdown(
                            "*The merged files appear here after a merge.*", elem_id="hm-files"
                        )
                job_state = gr.State(None)

        static = {
            "base": base,
            "experts": experts,
            "method": method_dd,
            "output_repo": output_repo,
            "private": private,
            "description": description,
            "flexmerge_sizes": flex_sizes,
            "dtype": dtype_dd,
            "output_dtype": out_dtype_dd,
        }
        highlightable = [base, experts, method_dd, output_repo, flex_sizes, dtype_dd, out_dtype_dd]
        static_info = {key: getattr(comp, "info", None) for key, comp in static.items()}

        def form_values(data: dict, widgets: dict) -> sf.FormValues:
            return sf.FormValues(
                method=data[method_dd] or "",
                params={spec.name: data[comp] for comp, spec in widgets.items()},
                base=data[base] or "",
                experts=data[experts] or "",
                output_repo=data[output_repo] or "",
                private=bool(data[private]),
                description=data[description] or "",
                flexmerge_sizes=(data[flex_sizes] or "") if has_flexmerge else "",
                dtype=data[dtype_dd] or "float32",
                output_dtype=data[out_dtype_dd] or "",
            )

        def highlight(errors: list[sf.FieldError], widgets: dict) -> dict:
            """Mark the fields at fault (red frame, message instead of help text); clear the others."""
            messages: dict[str, str] = {}
            for error in errors:
                if error.target:
                    messages.setdefault(error.target, error.message)
            fields = [(key, comp, static_info[key]) for key, comp in static.items() if comp in highlightable]
            fields += [(f"param:{spec.name}", comp, spec.info) for comp, spec in widgets.items()]
            updates = {}
            for key, comp, info in fields:
                if key in messages:
                    updates[comp] = gr.update(elem_classes=["hm-invalid"], info=f"✖ {messages[key]}")
                else:
                    updates[comp] = gr.update(elem_classes=[], info=info)
            return updates

        def recipe_file(text: str, name: str) -> str:
            folder = settings.workdir / "recipes" / uuid.uuid4().hex[:12]
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{name}.yaml"
            path.write_text(text, encoding="utf-8")
            return str(path)

        def check(data: dict, widgets: dict, *, check_hub: bool) -> tuple[sj.Validation, dict]:
            form = form_values(data, widgets)
            result = sj.validate(
                form, methods.get(form.method), token=settings.token(data[token]), check_hub=check_hub
            )
            out = highlight(result.errors, widgets)
            out[yaml_code] = result.yaml
            name = (
                result.recipe.name
                if result.recipe is not None
                else sf.recipe_name(form.output_repo, form.method)
            )
            out[download_btn] = gr.DownloadButton(value=recipe_file(result.yaml, name), interactive=True)
            return result, out

        def announce_merge():
            busy = sj.GATE.busy_message()
            return (
                busy or _status("busy", "Checking the recipe and the models on the Hub…"),
                gr.update(value="", visible=True),
            )

        # -------------------------------------------------------------- the parameter widgets
        def render_params(current: dict):
            """Build the chosen method's parameter widgets and the listeners that read them."""
            info = methods.get(current.get("method")) or methods[default_method]
            values = current.get("values") or {}
            widgets: dict[gr.components.Component, sf.WidgetSpec] = {}
            if not info.params:
                gr.Markdown(f"*{info.name} has no parameters.*")
            for spec in info.params:
                key = (
                    "param",
                    info.name,
                    current.get("nonce", 0),
                    spec.name,
                )  # a loaded recipe bumps the nonce
                widgets[_param_widget(spec, values.get(spec.name, spec.default), key)] = spec

            inputs = {*static.values(), token, *widgets}
            form_outputs = [*highlightable, *widgets]

            @_guarded(status)
            def on_validate(data: dict):
                result, out = check(data, widgets, check_hub=True)
                if result.errors:
                    out[status] = _errors_markdown(result.errors)
                else:
                    out[status] = _status(
                        "ok",
                        "The recipe is valid and every model was found on the Hub. "
                        "Press **Merge** to run it.",
                    )
                out[tabs] = gr.Tabs(selected="yaml")
                return out

            validate_btn.click(
                on_validate,
                inputs=inputs,
                outputs=[status, yaml_code, download_btn, tabs, *form_outputs],
                show_progress_on=[status],
                concurrency_limit=4,
            )

            @_guarded(status, hide=progress_box)
            def on_merge(data: dict, progress=gr.Progress()):  # noqa: B008 - Gradio's way
                yield {status: _status("busy", "Checking the recipe and the models on the Hub…")}
                result, out = check(data, widgets, check_hub=True)
                out[tabs] = gr.Tabs(selected="yaml")
                if result.errors:
                    out[status] = _errors_markdown(result.errors)
                    yield out
                    return
                yield {status: _status("busy", "Merging on this Space; the bar below follows the tensors.")}
                progress(0, desc="Downloading the base model and the experts…")

                def report(event) -> None:
                    progress(
                        (event.bytes_done, event.bytes_total),
                        desc=f"{sj.stage_label(event.stage)}: tensor {event.tensors_done} of "
                        f"{event.tensors_total}",
                        unit="bytes",
                    )

                with sj.GATE.hold("merge"):
                    try:
                        outcome = sj.run_merge(
                            result.recipe, settings=settings, token=data[token], progress=report
                        )
                    except sj.SpaceError as exc:
                        out[status] = _status("error", f"**The merge failed:** {exc}")
                        out[job_state] = None
                        out[push_btn] = gr.Button(interactive=False)
                        yield out
                        return
                out[status] = _status(
                    "ok", outcome.summary + "  \nCheck the model card, then press **Push to Hub**."
                )
                out[card_md] = sj.card_preview(outcome.card)
                out[files_md] = (
                    f"**Output size: {sj.human_bytes(outcome.size_bytes)}** in "
                    f"{len(outcome.files)} files\n\n" + sj.size_table(outcome.files)
                )
                out[job_state] = outcome.job_id
                out[push_btn] = gr.Button(interactive=True)
                out[tabs] = gr.Tabs(selected="card")
                yield out

            merge_btn.click(announce_merge, outputs=[status, progress_box], queue=False).then(
                on_merge,
                inputs=inputs,
                outputs=[
                    status,
                    progress_box,
                    yaml_code,
                    download_btn,
                    tabs,
                    card_md,
                    files_md,
                    job_state,
                    push_btn,
                    *form_outputs,
                ],
                show_progress_on=[progress_box],
                concurrency_limit=1,
                concurrency_id=JOB_CONCURRENCY_ID,
            )

        # -------------------------------------------------------------- everything else
        def on_method(name: str, current: dict):
            current = current or {}
            if name == current.get("method"):  # the dropdown may report one choice twice: no second render
                return gr.skip(), gr.skip()
            info = methods.get(name)
            return (
                {"method": name, "values": {}, "nonce": current.get("nonce", 0)},
                info.markdown() if info else "",
            )

        method_dd.input(on_method, inputs=[method_dd, seed], outputs=[seed, method_md])

        @_guarded(status)
        def on_load(name: str | None, current: dict):
            if not name or recipes_dir is None:
                return {load_note: _status("info", "Pick a recipe file first.")}
            from hubmerge.recipe import parse_yaml

            path = recipes_dir / name
            try:
                data = parse_yaml(path.read_text(encoding="utf-8"), file=name)
                form, warnings = sf.form_from_recipe(data, methods)
            except (OSError, ValueError) as exc:
                return {load_note: _status("error", f"Cannot load {name}: {sj.one_line(exc)}")}
            note = _status("ok", f"Loaded **{name}**. Check the fields, then press **Check**.")
            if warnings:
                note += "\n\n" + "\n".join(f"- ⚠ {w}" for w in warnings)
            info = methods.get(form.method)
            return {
                method_dd: form.method,
                method_md: info.markdown() if info else "",
                seed: {
                    "method": form.method,
                    "values": form.params,
                    "nonce": (current or {}).get("nonce", 0) + 1,
                },
                base: form.base,
                experts: form.experts,
                output_repo: form.output_repo,
                private: form.private,
                description: form.description,
                flex_sizes: form.flexmerge_sizes,
                dtype_dd: form.dtype,
                out_dtype_dd: form.output_dtype,
                load_note: note,
            }

        load_btn.click(
            on_load,
            inputs=[recipe_dd, seed],
            outputs=[
                method_dd,
                method_md,
                seed,
                base,
                experts,
                output_repo,
                private,
                description,
                flex_sizes,
                dtype_dd,
                out_dtype_dd,
                load_note,
                status,
            ],
        )

        def announce_push():
            busy = sj.GATE.busy_message()
            return busy or _status("busy", "Pushing to the Hub…"), gr.update(value="", visible=True)

        @_guarded(status, hide=progress_box)
        def on_push(
            job_id: str | None,
            repo: str,
            is_private: bool,
            typed_token: str,
            progress=gr.Progress(),  # noqa: B008 - Gradio's way
        ):
            yield {status: _status("busy", "Pushing to the Hub in one commit…")}
            progress(0, desc="Uploading in one commit…")
            with sj.GATE.hold("push"):
                try:
                    outcome = sj.push(job_id, repo, private=is_private, token=typed_token, settings=settings)
                except sj.SpaceError as exc:
                    yield {status: _status("error", f"**The push failed:** {exc}")}
                    return
            yield {
                status: _status(
                    "ok",
                    f"Published **[{outcome.repo_id}]({outcome.url})** "
                    f"(commit `{outcome.commit[:12]}`): {outcome.url}",
                ),
                card_md: sj.card_preview(outcome.card),
                tabs: gr.Tabs(selected="card"),
            }

        push_btn.click(announce_push, outputs=[status, progress_box], queue=False).then(
            on_push,
            inputs=[job_state, output_repo, private, token],
            outputs=[status, progress_box, card_md, tabs],
            show_progress_on=[progress_box],
            concurrency_limit=1,
            concurrency_id=JOB_CONCURRENCY_ID,
        )

    app.hubmerge_settings = settings
    return app


def launch(app: gr.Blocks, *, host: str | None = None, port: int | None = None, **kwargs: Any):
    """Launch the app with the Space's queue (one job at a time) and stylesheet.

    Args:
        app: What :func:`build_app` returned.
        host: Interface to bind (default: ``GRADIO_SERVER_NAME`` or 127.0.0.1).
        port: Port (default: ``GRADIO_SERVER_PORT`` or 7860).
        **kwargs: Passed to ``Blocks.launch``.
    """
    settings = getattr(app, "hubmerge_settings", None)
    allowed = [str(settings.workdir)] if settings else []
    app.queue(default_concurrency_limit=1, max_size=32)
    return app.launch(
        server_name=host,
        server_port=port,
        css=CSS,
        theme=gr.themes.Soft(),
        allowed_paths=allowed,
        show_error=False,
        **kwargs,
    )


def main(argv: list[str] | None = None) -> None:
    """``python app.py [--host H] [--port P] [--use-stored-token]``."""
    parser = argparse.ArgumentParser(description="The hubmerge Space")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument(
        "--use-stored-token",
        action="store_true",
        help="let an empty token field use HF_TOKEN / your stored login (your own machine only)",
    )
    args = parser.parse_args(argv)
    app = build_app(settings=sj.Settings(use_stored_token=args.use_stored_token))
    launch(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
