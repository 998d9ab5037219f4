"""The `nextmm` command. Every user mistake ends in one sentence on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from nextmm.config import NEGATIVES
from nextmm.errors import UserError

PLACEHOLDER = re.compile(r"<image>|<video>")
# CLI flag -> the argument name of the reader in nextmm.data.formats
FORMAT_FLAGS = {"annotations": "annotations_json", "images": "image_dir", "questions": "questions_json", "jsonl": "jsonl_path", "root": "root",
                "json": "json_path", "max_frames": "max_frames"}


def _print_json(payload: dict) -> None:
    print(json.dumps(payload, indent=2, default=str))


def cmd_data(args: argparse.Namespace) -> None:
    if args.source == "shapes":
        from nextmm.config import make_config, parse_override
        from nextmm.data.make import write_shapes

        if args.only and not args.count:
            raise UserError("--only writes the kinds --count names, and none is named; add e.g. --count conversation=2000")
        cfg = make_config(args.preset)
        counts = {} if args.only else dict(cfg.data.counts)
        for item in args.count or []:
            counts.update(parse_override(item))
        written = write_shapes(args.out, counts, args.seed, cfg.data.shard_size, overwrite=args.overwrite)
        _print_json({"out_dir": args.out, "samples": written})
        return
    from nextmm.data.formats import convert

    paths = {reader_arg: getattr(args, flag) for flag, reader_arg in FORMAT_FLAGS.items() if getattr(args, flag, None)}
    _print_json(convert(args.source, args.out, max_side=args.max_side, **paths))


def cmd_train(args: argparse.Namespace) -> None:
    from nextmm.config import apply_overrides, make_config
    from nextmm.data.loader import discover_sources
    from nextmm.train import parallel
    from nextmm.train.stages import split_batches, train

    # the flags are settings too, checked with the others
    settings = [*(args.set or []), *(["pretrain.sharding=fsdp"] if args.fsdp else []), *(["pretrain.compile=true"] if args.compile else [])]
    if args.init:
        from nextmm.api import saved_config

        if args.config or args.preset != "tiny":
            raise UserError("--init trains the model directory's own architecture; drop --config and --preset, and change settings with --set")
        cfg = apply_overrides(saved_config(args.init), settings)
    else:
        cfg = make_config(args.preset, args.config, settings)
    if args.nproc < 1:
        raise UserError(f"--nproc {args.nproc} must be at least 1")
    if args.nproc > 1 and not parallel.launched():
        # the mistakes every process would make, said once before any starts
        split_batches(cfg, args.nproc)
        discover_sources(args.data)
        sys.exit(parallel.launch(args.nproc, args.argv))
    if parallel.launched() and args.nproc > 1 and args.nproc != parallel.local_processes():
        raise UserError(f"--nproc {args.nproc} asks for {args.nproc} processes but torchrun started {parallel.local_processes()} here; drop --nproc under torchrun")
    result = train(cfg, args.data, args.out, resume=args.resume, device=args.device, init=args.init, timeout_s=args.timeout)
    print(f"model written to {result['model']} (each stage's metrics.jsonl in {args.out}/<stage>/)")


def cmd_tune(args: argparse.Namespace) -> None:
    from nextmm.train.tune import tune

    # the flags are settings too, checked with the others
    flags = [*(["tune.full=true"] if args.full else []), *(["tune.save=adapter"] if args.adapter else []),
             *([f"tune.steps={args.steps}"] if args.steps is not None else [])]
    result = tune(args.model, args.data, args.out, [*(args.set or []), *flags], resume=args.resume, device=args.device)
    kind = "adapter" if (Path(result["model"]) / "adapter_config.json").is_file() else "model"
    print(f"{kind} written to {result['model']} (metrics.jsonl and checkpoints in {result['run']}); load it with nextmm.load('{result['model']}')")


def cmd_init(args: argparse.Namespace) -> None:
    from nextmm.convert.parts import init_model

    out = init_model(args.llm, args.vision, args.out, args.decoder, args.preset, args.set or [], args.vision_layer)
    print(f"model written to {out}; train it with: nextmm train --init {out} --data DIR --out RUN")


def cmd_convert(args: argparse.Namespace) -> None:
    from nextmm.convert.emu1 import convert_emu1

    out = convert_emu1(args.checkpoint, args.out, args.tokenizer, args.set or [])
    print(f"model written to {out} (Emu1's unet/ and vae/ are not converted, so it draws no images); train it with: nextmm train --init {out} --data DIR --out RUN")


def cmd_export(args: argparse.Namespace) -> None:
    from nextmm import api
    from nextmm.convert.hf_llm import export_hf_llm
    from nextmm.convert.parts import llm_architecture

    if not (args.llm_out or args.out):
        raise UserError("nothing to export; give --llm-out DIR (the LLM as a Hugging Face model) and/or --out DIR (the whole model)")
    if bool(args.model) == bool(args.checkpoint):
        raise UserError("export takes one of --model MODEL (a model directory) and --checkpoint CKPT (a stage-1 training checkpoint)")
    m = api.load(args.model, device="cpu") if args.model else api.from_checkpoint(args.checkpoint, device="cpu")
    if args.llm_out:
        llm = m.model.llm
        written = export_hf_llm(llm, llm.cfg, m.tokenizer, args.llm_out, args.architecture or llm_architecture(llm.cfg))
        print(f"LLM written to {written} (transformers: AutoModelForCausalLM.from_pretrained('{written}'))")
    if args.out:
        print(f"model written to {m.save(args.out)}")


def _load(args: argparse.Namespace):
    from nextmm import api

    return api.load(args.model, device=args.device)


def _answers(args: argparse.Namespace) -> list[str] | None:
    from nextmm.constrained import read_answers

    return read_answers(args.answers) if args.answers else None


def cmd_caption(args: argparse.Namespace) -> None:
    answers = _answers(args)
    m = _load(args)
    for path, caption in zip(args.images, m.caption(args.images, answers=answers)):
        print(f"{path}\t{caption}")


def cmd_ask(args: argparse.Namespace) -> None:
    answers = _answers(args)
    m = _load(args)
    visual = args.image[0] if len(args.image) == 1 else args.image
    print(m.ask([visual], [args.question], answers=answers)[0])


def video_frames(spec: str) -> list[str]:
    """A video is a folder of frames (sorted by name) or a comma-separated list of frame files."""
    folder = Path(spec)
    if folder.is_dir():
        frames = sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not frames:
            raise UserError(f"video folder '{spec}' holds no .png/.jpg frames; put the frames in it")
        return frames
    if "," not in spec and not folder.exists():
        raise UserError(f"video '{spec}' is neither a folder of frames nor a frame file; give a folder of .png/.jpg frames or frame files separated by commas")
    return [part for part in spec.split(",") if part]


def parse_prompt(text: str, images: list[str], videos: list[str]) -> list:
    """'<image> this is a blicket <image> this is a' with --image a.png --image b.png -> interleaved parts."""
    tags = PLACEHOLDER.findall(text)
    want = (tags.count("<image>"), tags.count("<video>"))
    if want != (len(images), len(videos)):
        raise UserError(
            f"the prompt has {want[0]} <image> and {want[1]} <video> placeholders but {len(images)} --image and "
            f"{len(videos)} --video were given; give one file per placeholder, in order"
        )
    pending_images, pending_videos = iter(images), iter(videos)
    parts: list = []
    for i, chunk in enumerate(PLACEHOLDER.split(text)):
        if chunk.strip():
            parts.append(chunk.strip())
        if i < len(tags):
            # Paths, not str: in a prompt a str is text (nextmm.api.to_segments)
            parts.append(Path(next(pending_images)) if tags[i] == "<image>" else [Path(f) for f in video_frames(next(pending_videos))])
    if not parts:
        raise UserError("the prompt is empty; write some text or <image> placeholders")
    return parts


def cmd_complete(args: argparse.Namespace) -> None:
    prompt = parse_prompt(args.prompt, args.image or [], args.video or [])
    answers = _answers(args)
    m = _load(args)
    print(m.complete([prompt], max_new_tokens=args.max_new_tokens, answers=answers)[0])


def cmd_chat(args: argparse.Namespace) -> None:
    from nextmm.console import Console

    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    m = _load(args)
    console = Console(m, Path(args.drawings), args.max_new_tokens, args.system or "", video_frames=video_frames)
    tty = sys.stdin.isatty()
    console.run(sys.stdin, prompt=(lambda: print("you: ", end="", flush=True)) if tty else (lambda: None))
    if console.drawn:
        print(f"drawings are in {args.drawings}")


def draw_prompt(text: str | None, images: list[str]) -> list:
    """Placeholders put the --image files where they stand; without any, the images come first and the
    text after them (an edit: --image a.png "make the red circle blue"; a blend: two --image, no text)."""
    if text and PLACEHOLDER.search(text):
        return parse_prompt(text, images, [])
    parts = [Path(image) for image in images] + ([text.strip()] if text and text.strip() else [])
    if not parts:
        raise UserError("nothing to draw from; give a prompt, or --image files to blend or edit")
    return parts


def cmd_draw(args: argparse.Namespace) -> None:
    from nextmm.train.checkpoint import write_file_atomically

    prompt = draw_prompt(args.prompt, args.image or [])
    if args.num < 1:
        raise UserError(f"--num {args.num} must be at least 1")
    m = _load(args)
    images = m.draw([prompt] * args.num, guidance=args.guidance, steps=args.steps, seed=args.seed, negative=args.negative,
                    candidates=args.candidates)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images):  # written only once every image is made: a failed run leaves no partial files
        path = out / f"{args.name}-{k:03d}.png"
        write_file_atomically(path, lambda tmp: image.save(tmp, format="PNG"))
        print(path)


def _write_results(results: dict, out: str | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2))
        print(f"results written to {out}", file=sys.stderr)
    _print_json(results)


def cmd_eval_shapes(args: argparse.Namespace) -> None:
    from nextmm.worlds.shapes.evaluation import evaluate, results_table

    results = evaluate(_load(args), scenes=args.scenes, videos=args.videos, binding=args.binding, seed=args.seed)
    results.pop("examples")
    _write_results(results, args.out)
    if args.out:
        table = Path(args.out).with_suffix(".md")
        table.write_text(results_table(results))
        print(f"table written to {table}", file=sys.stderr)


def _model_unless_scoring(args: argparse.Namespace):
    if args.predictions:
        return None
    if not args.model:
        raise UserError("give --model to make predictions, or --predictions to score a results file")
    return _load(args)


def _logged(args: argparse.Namespace, run) -> None:
    """Run an eval that logs its predictions as made; if it stops half-way, say where they are."""
    from nextmm.eval.files import predictions_path

    try:
        results = run()
    except BaseException:
        if args.out and not args.predictions:
            print(f"predictions so far are in {predictions_path(args.out)}", file=sys.stderr)
        raise
    _write_results(results, args.out)


def _support(args: argparse.Namespace, m, make) -> dict:
    """The few-shot options of `eval captions` / `eval vqa`: none, or a support set made by `make(m)`."""
    if not args.shots:
        return {}
    if args.predictions:
        raise UserError("--shots makes predictions with the model; it does not go with --predictions")
    if not (args.support_annotations and args.support_images) or (hasattr(args, "support_questions") and not args.support_questions):
        raise UserError("--shots needs a support split to take the examples from: --support-annotations and --support-images"
                        + (" and --support-questions" if hasattr(args, "support_questions") else ""))
    return {"support": make(m), "shots": args.shots, "selection": args.select}


def cmd_eval_captions(args: argparse.Namespace) -> None:
    from nextmm.eval.language import coco_support, eval_captions

    m = _model_unless_scoring(args)
    few = _support(args, m, lambda m: coco_support(m, args.support_annotations, args.support_images, args.support_limit))
    _logged(args, lambda: eval_captions(m, args.annotations, args.images, args.out, args.limit, args.predictions, args.tokenizer, not args.no_meteor, **few))


def cmd_eval_vqa(args: argparse.Namespace) -> None:
    from nextmm.eval.language import eval_vqa, vqa_support_files

    answers = _answers(args)
    m = _model_unless_scoring(args)
    few = _support(args, m, lambda m: vqa_support_files(m, args.support_questions, args.support_annotations, args.support_images, args.support_limit))
    _logged(args, lambda: eval_vqa(m, args.questions, args.annotations, args.images, args.out, args.limit, args.predictions, answers, **few))


def cmd_eval_videoqa(args: argparse.Namespace) -> None:
    from nextmm.eval.language import eval_video_qa, video_questions, video_questions_json

    answers = _answers(args)
    if bool(args.root) == bool(args.qa and args.frames):
        raise UserError("give either --root (one folder per video with qa.json) or --qa and --frames (MSRVTT-QA style)")
    questions = video_questions(args.root) if args.root else video_questions_json(args.qa, args.frames)  # checked before the model loads
    m = _load(args)
    _logged(args, lambda: eval_video_qa(m, questions, args.out, args.limit, answers))


def cmd_eval_grounding(args: argparse.Namespace) -> None:
    from nextmm.eval.visual import eval_grounding, grounding_records

    expressions = grounding_records(args.refs, args.images)  # checked before the model loads
    m = _load(args)
    _logged(args, lambda: eval_grounding(m, expressions, args.out, args.limit))


def cmd_eval_images(args: argparse.Namespace) -> None:
    from nextmm.eval.visual import eval_images

    m = _load(args)
    results = eval_images(m, args.prompts, args.reference, args.save_images, args.features, args.guidance, args.steps, args.seed,
                          args.candidates)
    _write_results(results, args.out)


def cmd_eval_retrieval(args: argparse.Namespace) -> None:
    from nextmm.eval.visual import eval_retrieval

    _write_results(eval_retrieval(_load(args), args.annotations, args.images, args.limit), args.out)


def cmd_eval_classify(args: argparse.Namespace) -> None:
    from nextmm.eval.visual import eval_classification

    _write_results(eval_classification(_load(args), args.images, args.template, args.method, args.limit), args.out)


def cmd_eval_fewshot(args: argparse.Namespace) -> None:
    from nextmm.eval.fewshot import SELECTIONS, evaluate_fewshot

    shots = _int_list(args.shots, "--shots")
    selections = [s.strip() for s in args.select.split(",") if s.strip()]
    unknown = [s for s in selections if s not in SELECTIONS]
    if unknown or not selections:
        raise UserError(f"--select '{args.select}' names no known selection; use {', '.join(SELECTIONS)} (comma-separated)")
    if any(k < 0 or k > 8 for k in shots):
        raise UserError(f"--shots '{args.shots}' must be whole numbers from 0 to 8 (the context holds eight examples)")
    m = _load(args)
    results = evaluate_fewshot(m, args.n, shots, selections, args.seed, progress=lambda what: print(f"[fewshot] {what}", file=sys.stderr))
    _write_results(results, args.out)


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"{flag} '{text}' is not a comma-separated list of whole numbers, e.g. 0,2,4,8") from None


def cmd_demo(args: argparse.Namespace) -> None:
    from nextmm.demo import run_demo

    result = run_demo(args.out, args.preset, args.set or [], resume=args.resume, device=args.device)
    headline = {k: result[k] for k in result if k.endswith(("match", "accuracy", "chance", "all_objects_right", "_s", "acc_at_0.5", "f1", "cider")) and not isinstance(result[k], dict)}
    _print_json(headline)
    print(f"model:   {result['model']}\nmetrics: {result['metrics']}\nreport:  {result['report']}")


def cmd_serve(args: argparse.Namespace) -> None:
    import os

    try:
        from nextmm.serve.app import Settings, serve
        from nextmm.serve.schema import Limits
    except ModuleNotFoundError as err:
        raise UserError(f"nextmm serve needs {err.name}, which is not installed; install the server's packages: pip install 'nextmm[serve]'") from None
    for flag in ("max_batch", "max_images", "max_tokens"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be at least 1")
    for flag in ("max_body_mb", "max_image_mb", "timeout"):
        if not getattr(args, flag) > 0:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be more than 0")
    if args.batch_wait_ms < 0:
        raise UserError(f"--batch-wait-ms {args.batch_wait_ms} must be 0 or more")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is not a port; give one from 1 to 65535 (0: any free one)")
    limits = Limits(max_body_bytes=int(args.max_body_mb * 2**20), max_image_bytes=int(args.max_image_mb * 2**20), max_images=args.max_images,
                    max_tokens=args.max_tokens, timeout_s=args.timeout, allow_local_files=args.allow_local_files)
    settings = Settings(model_name=args.model_name or Path(args.model).resolve().name, api_key=args.api_key or os.environ.get("NEXTMM_API_KEY") or None,
                        max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, limits=limits)
    serve(_load(args), settings, args.host, args.port)


ANSWERS_HELP = "closed set: the output is one of these (comma-separated, or a file with one per line)"


def _benchmark(esub, name: str, help_text: str, func, logged: bool = False, model_required: bool = True) -> argparse.ArgumentParser:
    """An `nextmm eval` subcommand with --model and --out (logged: predictions go to OUT.predictions.jsonl as made)."""
    b = esub.add_parser(name, help=help_text)
    b.add_argument("--model", required=model_required, help="the model directory" + ("" if model_required else " (not needed with --predictions)"))
    b.add_argument("--out", help="write the scores here too" + (", and each prediction as made to OUT.predictions.jsonl" if logged else ""))
    add_device_flag(b)
    b.set_defaults(func=func, predictions=None)
    return b


def add_eval_parsers(esub) -> None:
    s = _benchmark(esub, "shapes", "held-out Shapes World: captions, VQA, video QA, binding, grounding, ITM, retrieval", cmd_eval_shapes)
    s.add_argument("--scenes", type=int, default=500)
    s.add_argument("--videos", type=int, default=200)
    s.add_argument("--binding", type=int, default=100)
    s.add_argument("--seed", type=int, default=10_007)
    for name, help_text, func in (("captions", "COCO captions -> BLEU-4, METEOR, ROUGE-L, CIDEr (pycocoevalcap)", cmd_eval_captions),
                                  ("vqa", "VQAv2 questions + annotations -> the official VQA accuracy", cmd_eval_vqa)):
        b = _benchmark(esub, name, help_text, func, logged=True, model_required=False)
        if name == "vqa":
            b.add_argument("--questions", required=True, help="VQAv2 questions JSON")
            b.add_argument("--answers", help=ANSWERS_HELP)
        b.add_argument("--annotations", required=True, help="COCO captions JSON" if name == "captions" else "VQAv2 annotations JSON")
        b.add_argument("--images", required=True, help="the image folder")
        b.add_argument("--limit", type=int, help="only the first N images (questions)")
        b.add_argument("--predictions", help="score this results file (JSON list or JSON lines) instead of running a model")
        b.add_argument("--shots", type=int, default=0, choices=range(0, 9), metavar="K", help="few-shot: K solved examples (0-8) before each query")
        b.add_argument("--select", choices=("random", "rices"), default="random", help="how the examples are chosen: at random, or the most similar images (RICES)")
        if name == "vqa":
            b.add_argument("--support-questions", help="few-shot examples: VQAv2 questions JSON of another split")
        b.add_argument("--support-annotations", help="few-shot examples: the annotations JSON of another split (e.g. train)")
        b.add_argument("--support-images", help="few-shot examples: that split's image folder")
        b.add_argument("--support-limit", type=int, default=1000, help="the support pool: its first N examples")
        if name == "captions":
            b.add_argument("--tokenizer", choices=("auto", "ptb", "simple"), default="auto", help="ptb needs Java; auto uses it when installed")
            b.add_argument("--no-meteor", action="store_true", help="skip METEOR (its Java process takes ~20 s to start)")
    f = _benchmark(esub, "fewshot", "few-shot captions, VQA and binding on held-out Shapes World, shots chosen at random or by RICES", cmd_eval_fewshot)
    f.add_argument("--n", type=int, default=100, help="queries (binding episodes) per task")
    f.add_argument("--shots", default="0,2,4,8", help="comma-separated shot counts")
    f.add_argument("--select", default="random,rices", help="random, rices (most similar images by CLIP features), or both")
    f.add_argument("--seed", type=int, default=10_007)
    v = _benchmark(esub, "videoqa", "open-ended video QA: a folder per video with its frames and qa.json", cmd_eval_videoqa, logged=True)
    v.add_argument("--root", help="one sub-folder per video: frame images and qa.json [{question, answer}]")
    v.add_argument("--qa", help="or: MSRVTT-QA / MSVD-QA questions JSON [{video_id, question, answer}] ...")
    v.add_argument("--frames", help="... with each video's frames in FRAMES/<video_id>/ (or video<video_id>/)")
    v.add_argument("--answers", help=ANSWERS_HELP)
    v.add_argument("--limit", type=int, help="only the first N questions")
    g = _benchmark(esub, "grounding", "RefCOCO-style expressions with boxes -> accuracy at IoU >= 0.5", cmd_eval_grounding, logged=True)
    g.add_argument("--refs", required=True, help='JSON list of {"image", "expression", "box": [x0, y0, x1, y1]} (or COCO "bbox": [x, y, w, h])')
    g.add_argument("--images", required=True, help="the image folder")
    g.add_argument("--limit", type=int, help="only the first N expressions")
    i = _benchmark(esub, "images", "text-to-image: FID against reference images, CLIP score, the Shapes World judge", cmd_eval_images)
    i.add_argument("--prompts", required=True, help="a text file, one prompt per line")
    i.add_argument("--reference", required=True, help="a folder of real images to compare the drawings with")
    i.add_argument("--features", default="clip", help="clip (the model's CLIP tower) or package.module:function mapping PIL images to an (n, d) array")
    i.add_argument("--guidance", type=float, default=None)
    i.add_argument("--steps", type=int, default=None)
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--candidates", type=int, default=1, help="draw each prompt from this many noises and keep the one the model judges best")
    i.add_argument("--save-images", help="save each drawing here as it is made")
    r = _benchmark(esub, "retrieval", "COCO captions -> image-text Recall@1/5/10 both ways (the CLIP stage)", cmd_eval_retrieval)
    r.add_argument("--annotations", required=True, help="COCO captions JSON")
    r.add_argument("--images", required=True, help="the image folder")
    r.add_argument("--limit", type=int, help="only the first N images (and their captions)")
    z = _benchmark(esub, "classify", "zero-shot classification of a folder with one sub-folder of images per class", cmd_eval_classify)
    z.add_argument("--images", required=True, help="the folder of class sub-folders (their names are the labels; _ reads as a space)")
    z.add_argument("--template", default="{}", help="the class prompt, {} standing for the label, e.g. 'a photo of a {}'")
    z.add_argument("--method", choices=("clip", "caption"), default="clip", help="CLIP similarity, or the LLM's caption constrained to the prompts")
    z.add_argument("--limit", type=int, help="at most N images per class")


def add_device_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="where to run: auto (a GPU when there is one, else the CPU), cpu, cuda, cuda:N or mps")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nextmm", description="Generative pretraining in multimodality (Emu-style).")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="write training data as WebDataset shards")
    dsub = data.add_subparsers(dest="source", required=True)
    d = dsub.add_parser("shapes", help="generate Shapes World (one sub-folder of shards per kind)")
    d.add_argument("--out", required=True)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--preset", default="tiny", help="whose data.counts to use")
    d.add_argument("--count", action="append", metavar="KIND=N", help="override one kind's count, e.g. caption=5000")
    d.add_argument("--only", action="store_true", help="write only the kinds --count names, e.g. --only --count conversation=2000 for nextmm tune")
    d.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    for name, needs in {
        "coco": ("annotations", "images"), "vqav2": ("questions", "annotations", "images"),
        "mmc4": ("jsonl", "images"), "video": ("root",),
    }.items():
        d = dsub.add_parser(name, help=f"convert {name} data to shards")
        for flag in needs:
            d.add_argument(f"--{flag}", required=True)
        d.add_argument("--out", required=True)
        d.add_argument("--max-side", type=int, default=None, help="shrink images so the longer side is at most this")
    d = dsub.add_parser("llava", help="convert LLaVA-format conversations (a JSON list of {id, image, video, conversations}) to shards")
    d.add_argument("--json", required=True, help="the LLaVA JSON file")
    d.add_argument("--images", required=True, help="the folder its image paths and video folders (of frame images) are relative to")
    d.add_argument("--out", required=True)
    d.add_argument("--max-side", type=int, default=None, help="shrink images so the longer side is at most this")
    d.add_argument("--max-frames", type=int, default=None, help="keep this many evenly spaced frames of each video (default: all)")
    data.set_defaults(func=cmd_data)

    t = sub.add_parser("train", help="train stage 0 (CLIP), stage 1 (Emu pretraining) and stage 2 (the visual decoder)")
    t.add_argument("--data", required=True, help="a shard folder, or a folder of shard folders (one source each)")
    t.add_argument("--init", help="start from this model directory (nextmm init, or an earlier run's model/) instead of from scratch")
    t.add_argument("--out", required=True)
    t.add_argument("--preset", default="tiny")
    t.add_argument("--config", help="YAML config (may name a preset)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="dotted override, e.g. pretrain.lr=3e-4")
    t.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoints in --out; a finished stage whose limits --set raised continues too, "
                        "and the stages built on it start afresh (their earlier runs moved to <stage>.old)")
    t.add_argument("--nproc", type=int, default=1,
                   help="train stage 1 data-parallel in this many processes on this machine (through torchrun); under torchrun, leave it out")
    t.add_argument("--fsdp", action="store_true",
                   help="with --nproc: shard stage 1's parameters, gradients and optimizer state among the processes (FSDP2) "
                        "rather than keep a whole copy in each (pretrain.sharding=fsdp)")
    t.add_argument("--compile", action="store_true", help="compile stage 1's LLM blocks with torch.compile (pretrain.compile=true)")
    t.add_argument("--timeout", type=float, default=1800.0,
                   help="with several processes: seconds one waits for the others at a step before it stops with an error")
    add_device_flag(t)
    t.set_defaults(func=cmd_train)

    u = sub.add_parser("tune", help="instruction-tune a model on conversations: LoRA on its LLM (Emu-I's recipe) or full fine-tuning")
    u.add_argument("--model", required=True, help="the model directory to tune (or an adapter folder that `nextmm tune --adapter` wrote)")
    u.add_argument("--data", required=True, help="conversation shards: a shard folder, or a folder of shard folders")
    u.add_argument("--out", required=True, help="where the tuned model goes (its run, metrics and checkpoints, in OUT/tune/)")
    u.add_argument("--full", action="store_true", help="fine-tune every weight of the LLM rather than LoRA adapters (tune.full=true)")
    u.add_argument("--adapter", action="store_true",
                   help="save peft's adapter folder, which nextmm.load applies to --model, rather than a merged model (tune.save=adapter)")
    u.add_argument("--steps", type=int, help="training steps (tune.steps; the preset's tune.time_budget_s may stop it sooner)")
    u.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="dotted override of the model's tune settings, of the loss's (pretrain.*) or of seed, e.g. tune.lora_rank=8")
    u.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUT/tune/, or from a finished run whose limits --set raised")
    add_device_flag(u)
    u.set_defaults(func=cmd_tune)

    n = sub.add_parser("init", help="build a model from pretrained parts in local folders: an LLM, a vision tower, a decoder")
    n.add_argument("--llm", required=True, help="a Hugging Face causal LM directory (Llama, Qwen2, Qwen3, Mistral) with its tokenizer.json")
    n.add_argument("--vision", required=True, help="a Hugging Face CLIP or SigLIP vision directory, or an EVA-CLIP state dict (file or directory)")
    n.add_argument("--decoder", help="a diffusers Stable Diffusion directory with vae/ and unet/")
    n.add_argument("--out", required=True, help="the model directory to write")
    n.add_argument("--preset", default="emu-14b", help="whose causal transformer and settings go around the parts (default: the paper's)")
    n.add_argument("--set", action="append", metavar="KEY=VALUE", help="dotted override, e.g. resampler.layers=6")
    n.add_argument("--vision-layer", type=int, help="which block's tokens Emu reads, as HF hidden_states index (default -2 for CLIP/SigLIP)")
    n.set_defaults(func=cmd_init)

    v = sub.add_parser("convert", help="convert a released checkpoint into a nextmm model directory")
    vsub = v.add_subparsers(dest="source", required=True)
    e1 = vsub.add_parser("emu1", help="the official Emu1 or Emu-I checkpoint (baaivision/Emu); its diffusers unet/, vae/ and scheduler/ are not converted",
                         description="The official Emu1 or Emu-I checkpoint (baaivision/Emu) as a nextmm model of the emu-14b preset. Its diffusers "
                                     "unet/, vae/ and scheduler/ are not converted: nextmm's decoder reads the visual embeddings through a condition "
                                     "projection that Emu1's UNet lacks.")
    e1.add_argument("checkpoint", help="the checkpoint folder (holding multimodal_encoder/), its pytorch_model.bin, or one .bin/.pt/.safetensors file (Emu-instruct.pt)")
    e1.add_argument("--tokenizer", required=True, help="a folder with LLaMA's tokenizer.json (fast format), e.g. Emu1's models/llama_config")
    e1.add_argument("--out", required=True, help="the model directory to write")
    e1.add_argument("--set", action="append", metavar="KEY=VALUE", help="dotted override of the emu-14b preset, e.g. training settings")
    v.set_defaults(func=cmd_convert)

    x = sub.add_parser("export", help="export a model: its LLM as a Hugging Face model directory, or the whole model again")
    x.add_argument("--model", help="a model directory")
    x.add_argument("--checkpoint", help="instead, a stage-1 training checkpoint (RUN/pretrain/checkpoints/step-N, one file or "
                                        "sharded; or the checkpoints folder for its latest): its model without a decoder")
    x.add_argument("--llm-out", help="write the LLM (with Emu's added tokens) here as a Hugging Face model directory")
    x.add_argument("--architecture", choices=("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM"),
                   help="the Hugging Face class to write (default: the one the LLM's options need)")
    x.add_argument("--out", help="write the whole model here as a nextmm model directory")
    x.set_defaults(func=cmd_export)

    c = sub.add_parser("caption", help="caption images")
    c.add_argument("--model", required=True)
    c.add_argument("images", nargs="+")
    c.add_argument("--answers", help=ANSWERS_HELP)
    add_device_flag(c)
    c.set_defaults(func=cmd_caption)

    a = sub.add_parser("ask", help="answer a question about an image (several --image: a video)")
    a.add_argument("--model", required=True)
    a.add_argument("--image", action="append", required=True)
    a.add_argument("question")
    a.add_argument("--answers", help=ANSWERS_HELP)
    add_device_flag(a)
    a.set_defaults(func=cmd_ask)

    k = sub.add_parser("complete", help="continue an interleaved prompt: text with <image>/<video> placeholders")
    k.add_argument("--model", required=True)
    k.add_argument("--image", action="append", help="file for the next <image> placeholder")
    k.add_argument("--video", action="append", help="frame folder or a,b,c frame list for the next <video>")
    k.add_argument("--max-new-tokens", type=int, default=32)
    k.add_argument("--answers", help=ANSWERS_HELP)
    k.add_argument("prompt")
    add_device_flag(k)
    k.set_defaults(func=cmd_complete)

    h = sub.add_parser("chat", help="chat with a model in the terminal: replies stream as they are decoded; /image and /video attach pictures")
    h.add_argument("--model", required=True)
    h.add_argument("--max-new-tokens", type=int, default=64, help="the longest reply, in tokens")
    h.add_argument("--system", help="a system message that opens the conversation")
    h.add_argument("--drawings", default="drawings", help="folder for the pictures the model draws")
    add_device_flag(h)
    h.set_defaults(func=cmd_chat)

    w = sub.add_parser("draw", help="draw images: from text, an interleaved prompt, two images to blend, or an image to edit")
    w.add_argument("--model", required=True)
    w.add_argument("--out", required=True, help="folder for the PNG files")
    w.add_argument("--image", action="append", help="a picture for the prompt (repeat to blend)")
    w.add_argument("--num", type=int, default=1, help="images per prompt, each from its own noise")
    w.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (1 = none; default: the config's)")
    w.add_argument("--steps", type=int, default=None, help="denoising steps (default: the config's)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--candidates", type=int, default=1,
                   help="draw each image from this many noises and keep the one the model judges to fit the text best (text prompts only)")
    w.add_argument("--negative", choices=NEGATIVES, help="guide away from the decoder's no-condition (null) or an empty prompt's image (empty, Emu's); default: the model's decoder.negative")
    w.add_argument("--name", default="draw", help="file name prefix: NAME-000.png, ...")
    w.add_argument("prompt", nargs="?", help='text, with <image> placeholders for the --image files if wanted')
    add_device_flag(w)
    w.set_defaults(func=cmd_draw)

    e = sub.add_parser("eval", help="evaluate a model")
    add_eval_parsers(e.add_subparsers(dest="suite", required=True))

    m = sub.add_parser("demo", help="the whole pipeline on Shapes World")
    m.add_argument("--out", default="runs/demo")
    m.add_argument("--preset", default="tiny")
    m.add_argument("--set", action="append", metavar="KEY=VALUE")
    m.add_argument("--resume", action="store_true", help="as for train: continue a killed demo, or extend a stage whose limits --set raised")
    add_device_flag(m)
    m.set_defaults(func=cmd_demo)

    s = sub.add_parser("serve", help="serve a model over OpenAI's API (chat completions with images, image generations) and a web page")
    s.add_argument("--model", required=True, help="a model directory")
    s.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8000, help="the port to listen on (0: a free one)")
    s.add_argument("--model-name", help="the name clients ask for (default: the model directory's name)")
    s.add_argument("--api-key", help="require this key as 'Authorization: Bearer KEY' (default: the NEXTMM_API_KEY environment variable; none: open)")
    s.add_argument("--max-batch", type=int, default=16, help="requests decoded together in one batch at most (1: one at a time)")
    s.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests to arrive before it starts")
    s.add_argument("--max-tokens", type=int, default=512, help="tokens a reply may have at most (and its length when a request asks none)")
    s.add_argument("--max-images", type=int, default=8, help="images a chat request may hold, and drawings an images request may ask for")
    s.add_argument("--max-image-mb", type=float, default=8.0, help="size of one image in a request at most")
    s.add_argument("--max-body-mb", type=float, default=32.0, help="size of a request body at most")
    s.add_argument("--timeout", type=float, default=120.0, help="seconds a request may take; a reply still being written then ends there")
    s.add_argument("--allow-local-files", action="store_true", help="let image_url parts name files on this machine (a path or file://)")
    add_device_flag(s)
    s.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for `train --nproc`, which starts itself again
    try:
        args.func(args)
    except UserError as err:
        print(f"nextmm: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nextmm: interrupted; run again with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
