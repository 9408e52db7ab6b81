"""``clipforge <command>``: one entry point for every job. ``clipforge <command> --help`` explains each."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .argtypes import positive_int

EPILOG = """examples:
  clipforge demo                                   train ViT-Tiny-64 on generated shapes (~2 min CPU), HTML report
  clipforge models                                 list the architectures in the zoo and their pretrained tags
  clipforge convert openai/ViT-B-32.pt out/ --to clipforge
  clipforge convert out/ hf_folder/ --to hf        a Hugging Face CLIPModel + CLIPProcessor folder
  clipforge convert out/ oc_folder/ --to open_clip  open_clip.create_model_and_transforms('local-dir:oc_folder')
  clipforge train --model ViT-Tiny-64 --train-data 'shards/train-{000000..000009}.tar' --steps 2000 --output runs/a
  clipforge train --config recipes/flickr8k.yaml   the published Flickr8k recipe
  clipforge finetune --pretrained CKPT --dataset-root ../shared/data/cifar10 --steps 500 --output runs/ft
  clipforge wise-ft --zeroshot CKPT --finetuned runs/ft/checkpoints/step-00000500 --alphas 0:1:0.1 --output runs/wise
  clipforge eval robustness --pretrained CKPT --dataset-root ../shared/data/cifar10 --max-images 2000
  clipforge classify photo.jpg photos/ --labels "a dog,a cat,a car" --pretrained CKPT
  clipforge end2end photos/ photos-search/ --pretrained CKPT   embed, index and serve a photo folder's search page
  clipforge cache                                  what $CLIPFORGE_CACHE holds; `clipforge cache clear --help`
"""


def _cmd_models(args) -> int:
    from . import list_models, list_pretrained
    from .models import get_model_config, tower_kind

    if args.name:
        return _describe_model(args.name)
    names = list_models()
    width = max(map(len, names))
    for name in names:
        cfg = get_model_config(name)
        tags = [t for _, t in list_pretrained(name)]
        print(f"{name:{width}s} {tower_kind(cfg):8s} {cfg['vision_cfg']['image_size']:4d}px  embed {cfg['embed_dim']:5d}  "
              f"pretrained: {', '.join(tags) or '-'}")
    return 0


def _describe_model(name: str) -> int:
    """One architecture: its config, and each pretrained tag's file, activation and image preprocessing."""
    from . import list_pretrained
    from .models import get_model_config
    from .pretrained import base_model_name, cached_path, get_pretrained

    config = get_model_config(name)
    print(f"{name}: {json.dumps(config)}")
    tags = [t for _, t in list_pretrained(name)]
    if not tags:
        print("no pretrained tags (train it, or load a checkpoint into it with --pretrained PATH)")
    for tag in tags:
        entry = get_pretrained(base_model_name(name), tag)
        source = entry.url.split("/resolve/")[0].replace("https://huggingface.co/", "hf-hub:") \
            if "huggingface.co" in entry.url else entry.url
        cached = any(cached_path(url).exists() for url in entry.urls)
        notes = ["QuickGELU" if entry.quick_gelu or config.get("quick_gelu") else "GELU"]
        notes += [f"{k} {v}" for k, v in entry.preprocess.items()]
        print(f"  {tag}: {source}  ({', '.join(notes)}{', cached' if cached else ''})")
    return 0


def _cmd_convert(args) -> int:
    from .convert import convert

    path = convert(args.src, args.dst, to=args.to, model=args.model, quick_gelu=args.quick_gelu,
                   trust_pickle=args.trust_pickle, overwrite=args.overwrite)
    print(f"wrote {args.to} checkpoint to {path}")
    return 0


def _cmd_tokenize(args) -> int:
    from . import get_tokenizer

    tokenizer = get_tokenizer(args.model, context_length=args.context_length)
    print(json.dumps(tokenizer(args.texts).tolist()))
    return 0


def build_parser(command: str | None = "*") -> argparse.ArgumentParser:
    """Every command's parser ("*"); with a ``command`` name, only that command's module is imported to define its
    arguments (the others get their one-line help; None: none of them), so that ``clipforge index build`` and
    ``clipforge --help`` never import torch."""
    parser = argparse.ArgumentParser(prog="clipforge", description="CLIP training, evaluation, search and "
                                     "captioning.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="<command>")

    p = sub.add_parser("models", help="list zoo architectures and pretrained tags")
    p.add_argument("name", nargs="?", help="one architecture: its config and each tag's source, activation and "
                                           "image preprocessing")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("convert", help="convert a checkpoint between formats",
                       description="Read SRC (OpenAI .pt, open_clip state dict or model folder, SigLIP's with a "
                       "timm image tower included, Hugging Face CLIPModel or SiglipModel folder, clipforge folder or "
                       "safetensors) and write DST in the chosen format. clipforge: a folder with model.safetensors "
                       "+ config.json (and a SigLIP model's tokenizer files); hf: a CLIPModel (SigLIP: SiglipModel) "
                       "folder transformers loads, with its processor and tokenizer files; openai: a state dict file "
                       "(.pt, or .safetensors) that openai/CLIP and open_clip load (CLIP only); open_clip: a folder "
                       "with open_clip_config.json (architecture and image preprocessing) + "
                       "open_clip_model.safetensors, which open_clip loads as local-dir:DST and, uploaded to the "
                       "Hugging Face Hub, as hf-hub:OWNER/NAME.")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", choices=["clipforge", "hf", "openai", "open_clip"], default="clipforge")
    p.add_argument("--model", help="architecture of SRC when it cannot be inferred (a zoo name)")
    p.add_argument("--quick-gelu", action=argparse.BooleanOptionalAction, default=None,
                   help="force QuickGELU on/off (OpenAI's weights use it; weights alone cannot tell)")
    p.add_argument("--trust-pickle", action="store_true", help="allow full unpickling of SRC (trusted files only)")
    p.add_argument("--overwrite", action="store_true", help="write into a DST folder that holds a checkpoint already "
                   "(or over a DST file); never over SRC itself")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("tokenize", help="print token ids of texts (a model's tokenizer; OpenAI CLIP's BPE by "
                       "default)")
    p.add_argument("texts", nargs="+")
    p.add_argument("--model", default=None, help="the model whose tokenizer and context length to use: a zoo name "
                   "(ViT-B-16-SigLIP), a checkpoint or Hugging Face folder, an hf-hub: repo")
    p.add_argument("--context-length", type=positive_int, default=None)
    p.set_defaults(func=_cmd_tokenize)

    for register in _EXTRA_COMMANDS:
        register(sub, command)
    return parser


def _register_lazy(name: str, module: str, help_text: str, function: str = "add_arguments"):
    """Commands whose modules import heavier dependencies register their own arguments, when they are the one
    asked for (or all of them: "*")."""
    def register(sub, command: str | None = "*"):
        import importlib

        parser = sub.add_parser(name, help=help_text)
        if command in ("*", name):
            getattr(importlib.import_module(f"clipforge.{module}"), function)(parser)
    register.command = name
    return register


def _user_errors() -> tuple:
    """The exceptions reported as one line rather than a traceback. An exception class can only be raised once its
    module is imported, so only the imported ones are looked up (importing the rest would import torch)."""
    # path errors name the user's own paths (a folder where a file goes, no permission ...)
    classes = [FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError, ValueError,
               MemoryError]
    for module, name in (("clipforge.checkpoint.errors", "CheckpointError"), ("clipforge.models", "UnknownModelError"),
                         ("clipforge.preprocess", "BadImageError"), ("clipforge.pretrained", "DownloadError")):
        if module in sys.modules:
            classes.append(getattr(sys.modules[module], name))
    return tuple(classes)


_EXTRA_COMMANDS: list = [
    _register_lazy("demo", "demo", "train on generated shapes (~2 min CPU), zero-shot + retrieval, HTML report"),
    _register_lazy("train", "train.cli", "contrastive training (one CPU to many GPUs)"),
    _register_lazy("finetune", "train.finetune_cli", "fine-tune CLIP on labelled data from its zero-shot classifier",
                   "add_finetune_arguments"),
    _register_lazy("wise-ft", "train.finetune_cli", "interpolate zero-shot and fine-tuned weights (WiSE-FT)",
                   "add_wise_ft_arguments"),
    _register_lazy("classify", "classify", "zero-shot labels for images among the class names you give"),
    _register_lazy("eval", "evaluate.cli",
                   "zero-shot, retrieval, linear-probe, few-shot and robustness evaluation; a sweep's results as tables"),
    _register_lazy("embed", "retrieval.cli", "embed an image collection into sharded .npy + parquet",
                   "add_embed_arguments"),
    _register_lazy("filter", "retrieval.cli", "keep the image-caption pairs a model scores as matching (CLIP score)",
                   "add_filter_arguments"),
    _register_lazy("import", "retrieval.cli", "adopt clip-retrieval's embeddings as a collection (no re-embedding)",
                   "add_import_arguments"),
    _register_lazy("index", "retrieval.cli", "build a FAISS index over embeddings", "add_index_arguments"),
    _register_lazy("search", "retrieval.cli", "search an indexed collection by text or image",
                   "add_search_arguments"),
    _register_lazy("export", "onnx_backend", "export a model as ONNX graphs for ONNX Runtime (fp32, int8)",
                   "add_export_arguments"),
    _register_lazy("bench", "bench.cli", "speed and memory side by side with open_clip and transformers"),
    _register_lazy("serve", "serve.cli", "HTTP API and web page for search and classification"),
    _register_lazy("end2end", "serve.cli", "embed images, index them and serve the search (clip-retrieval's "
                   "end2end); again after adding images", "add_end2end_arguments"),
    _register_lazy("caption", "captioning.cli", "LiMBer: caption images via one linear map into a frozen LM"),
    _register_lazy("cache", "cache_cli", "list or clear what clipforge keeps in $CLIPFORGE_CACHE (downloads, "
                   "features, tables)"),
]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((word for word in argv if not word.startswith("-")), None)
    parser = build_parser(command if command in {r.command for r in _EXTRA_COMMANDS} else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1

    device = getattr(args, "device", None)
    from .environment import device_problem

    problem = device_problem(device) if isinstance(device, str) else None
    if problem:
        print(f"clipforge {args.command}: error: --device {device}: {problem}", file=sys.stderr)
        return 2
    try:
        code = args.func(args) or 0
        sys.stdout.flush()  # here, so that a closed pipe is caught below, not at interpreter exit
        if "TORCHELASTIC_RUN_ID" in os.environ and "torch.distributed" in sys.modules:
            from .train.loop import exit_torchrun_rank

            exit_torchrun_rank(code)  # a gloo thread can abort the interpreter's shutdown (see there)
        return code
    except KeyboardInterrupt:
        print(f"clipforge {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like, which stopped reading: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second traceback at interpreter exit
        return 0
    except Exception as exc:
        if not isinstance(exc, _user_errors()):
            raise
        print(f"clipforge {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
