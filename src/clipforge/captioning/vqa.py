"""Visual question answering with a LiMBer map, as the paper evaluates it: the image prompt, then
``Q: {question} A:``, with n solved examples (image prompt, question, answer) interleaved before it, and the
language model's greedy answer scored by VQA accuracy.

The map was trained on captions only, never on questions: what it answers, it answers from what the image prompt
carries. VQA accuracy is VQAv2's: an answer counts min(#annotators who gave it / 3, 1), averaged over the ten
leave-one-annotator-out subsets, after VQAv2's answer normalisation (punctuation, articles, number words,
contractions). Data in VQAv2's format: a questions JSON ({"questions": [{"question_id", "image_id", "question"}]})
and an annotations JSON ({"annotations": [{"question_id", "answers": [{"answer"}]}]}), images by id in a folder.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import torch

from ..files import read_user_text

# VQAv2's evaluation normalisation (Antol et al. 2015; the official vqaEval.py), reimplemented.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "lets": "let's", "mightnt": "mightn't",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "shant": "shan't", "shes": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "thats": "that's",
    "thered": "there'd", "theres": "there's", "theyd": "they'd", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "wasnt": "wasn't", "wed": "we'd", "weve": "we've", "werent": "weren't", "whats": "what's",
    "whens": "when's", "wheres": "where's", "whos": "who's", "whyre": "why're", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "yall": "y'all", "youd": "you'd", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
                "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def normalize_answer(answer: str) -> str:
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    for p in _PUNCTUATION:  # a mark next to a space (or any, in a number with a comma) goes; else it splits words
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _PERIOD_STRIP.sub("", text)
    words = []
    for word in text.lower().split():
        word = _NUMBERS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQAv2 accuracy of one prediction against the annotators' answers (10 in VQAv2)."""
    predicted = normalize_answer(prediction)
    given = [normalize_answer(a) for a in answers]
    if len(given) == 1:
        return float(predicted == given[0])
    scores = []
    for left_out in range(len(given)):
        others = given[:left_out] + given[left_out + 1:]
        scores.append(min(1.0, sum(a == predicted for a in others) / 3))
    return sum(scores) / len(scores)


def load_vqa(questions_file: str | Path, annotations_file: str | Path) -> list[dict]:
    """[{question_id, image_id, question, answers}] from VQAv2-format files."""
    questions = json.loads(read_user_text(questions_file, "questions"))["questions"]
    annotations = json.loads(read_user_text(annotations_file, "annotations"))["annotations"]
    annotations = {a["question_id"]: a for a in annotations}
    items = []
    for q in questions:
        annotation = annotations.get(q["question_id"])
        if annotation is None:
            raise ValueError(f"question {q['question_id']} has no annotation in {annotations_file}")
        items.append({**q, "answers": [a["answer"] for a in annotation["answers"]]})
    if not items:
        raise ValueError(f"{questions_file}: no questions")
    return items


def _embed_text(lm, tokenizer, text: str, device) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
    return lm.get_input_embeddings()(ids)[0]


def _prompt_embeddings(mapping, lm, tokenizer, features: torch.Tensor, question: str, shots) -> torch.Tensor:
    """[length, lm_dim]: each solved example as its image prompt + " Q: ... A: answer", then the image prompt and
    " Q: {question} A:"."""
    device = next(mapping.parameters()).device
    parts = []
    for shot_features, shot_question, shot_answer in shots:
        parts.append(mapping(shot_features[None].to(device))[0])
        parts.append(_embed_text(lm, tokenizer, f" Q: {shot_question} A: {shot_answer}\n", device))
    parts.append(mapping(features[None].to(device))[0])
    parts.append(_embed_text(lm, tokenizer, f" Q: {question} A:", device))
    return torch.cat(parts)


@torch.no_grad()
def answer_batch(mapping, lm, tokenizer, prompts: list[tuple], max_new_tokens: int = 5,
                 min_new_tokens: int = 0) -> list[str]:
    """Greedy answers to several prompts at once; ``prompts``: (features, question, shots) each, as for ``answer``.
    ``min_new_tokens``: the LM may not end the text before this many tokens [0: how ``caption vqa`` measures VQA
    accuracy, where an LM that ends the text at once has answered nothing and scores 0].

    Prompts of different lengths are left-padded (masked, with positions counted from each prompt's first real
    token), so every answer is the one its prompt gets alone: decoding a 135M-parameter LM on a CPU is bound by
    reading its weights once per step, and a batch reads them once for all of its prompts."""
    embedded = [_prompt_embeddings(mapping, lm, tokenizer, f, q, shots) for f, q, shots in prompts]
    longest = max(len(e) for e in embedded)
    inputs = embedded[0].new_zeros(len(embedded), longest, embedded[0].shape[-1])
    mask = torch.zeros(len(embedded), longest, dtype=torch.long, device=inputs.device)
    for row, e in enumerate(embedded):
        inputs[row, longest - len(e):], mask[row, longest - len(e):] = e, 1
    inputs = inputs.to(lm.get_input_embeddings().weight.dtype)
    out = lm.generate(inputs_embeds=inputs, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                      min_new_tokens=min_new_tokens, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.eos_token_id)
    return [re.split(r"[\n.]|Q:", text.strip(), maxsplit=1)[0].strip()
            for text in tokenizer.batch_decode(out, skip_special_tokens=True)]


def answer(mapping, lm, tokenizer, features: torch.Tensor, question: str, shots: list[tuple] = (),
           max_new_tokens: int = 5) -> str:
    """The greedy answer to ``question`` about the image with ``features`` ([image_dim] or [k, image_dim]), after
    ``shots``: solved examples (features, question, answer), each as its image prompt + "Q: ... A: answer"."""
    return answer_batch(mapping, lm, tokenizer, [(features, question, shots)], max_new_tokens)[0]


def evaluate(mapping, lm, tokenizer, items: list[dict], features: dict, shots: int = 0, seed: int = 0,
             max_new_tokens: int = 5, progress: bool = True, batch_size: int = 16, min_new_tokens: int = 0) -> dict:
    """VQA accuracy over ``items`` with ``shots`` solved examples drawn (seeded, per question) from the other items;
    ``features``: image_id -> image features; ``batch_size`` questions per LM call; ``min_new_tokens`` as for
    ``answer_batch``. Returns {accuracy, answers}."""
    from tqdm import tqdm

    prompts = []
    for index, item in enumerate(items):
        rng = random.Random(f"vqa-{seed}-{index}")
        pool = [other for other in items if other["image_id"] != item["image_id"]]
        examples = [(features[o["image_id"]], o["question"], o["answers"][0])
                    for o in rng.sample(pool, min(shots, len(pool)))]
        prompts.append((features[item["image_id"]], item["question"], examples))
    predicted = []
    with tqdm(total=len(items), desc=f"VQA {shots}-shot", unit="q", disable=not progress) as bar:
        for begin in range(0, len(prompts), batch_size):
            batch = prompts[begin:begin + batch_size]
            predicted += answer_batch(mapping, lm, tokenizer, batch, max_new_tokens, min_new_tokens)
            bar.update(len(batch))
    rows = [{"question_id": item["question_id"], "question": item["question"], "prediction": p,
             "answers": item["answers"], "accuracy": vqa_accuracy(p, item["answers"])}
            for item, p in zip(items, predicted)]
    accuracy = sum(r["accuracy"] for r in rows) / len(rows)
    return {"accuracy": accuracy, "shots": shots, "questions": len(rows), "answers": rows}


def shapes_vqa(folder: str | Path, n_images: int = 60, seed: int = 0, image_size: int = 64) -> tuple[Path, Path, Path]:
    """A VQA set in VQAv2's format over generated shapes (``clipforge.data.shapes``), answers known: colour, shape,
    position, and the number of shapes (1 to 3 of one kind per image). Writes images/<id>.png, questions.json and
    annotations.json under ``folder``; returns their paths."""
    from ..data.shapes import attributes

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    questions, annotations = [], []
    for image_id in range(n_images):
        attrs = attributes(seed, image_id)
        count = 1 + image_id % 3
        image = render_count(attrs, count, image_size)
        image.save(folder / "images" / f"{image_id}.png")
        asked = [("What colour is the shape?", attrs["colour"]), ("What shape is it?", attrs["shape"]),
                 ("Where is the shape?", attrs["position"]) if count == 1 else None,
                 ("How many shapes are there?", str(count))]
        for question, truth in filter(None, asked):
            question_id = len(questions)
            questions.append({"question_id": question_id, "image_id": image_id, "question": question})
            annotations.append({"question_id": question_id, "answers": [{"answer": truth}] * 10})
    (folder / "questions.json").write_text(json.dumps({"questions": questions}))
    (folder / "annotations.json").write_text(json.dumps({"annotations": annotations}))
    return folder / "images", folder / "questions.json", folder / "annotations.json"


def render_count(attrs: dict, count: int, size: int):
    """``count`` copies of the shape, side by side in a row (one copy: rendered at its own position)."""
    from PIL import Image

    from ..data.shapes import render

    if count == 1:
        return render(attrs, size)
    image = Image.new("RGB", (size, size), (225, 225, 225))
    cell = size // count
    for i in range(count):
        tile = render({**attrs, "size": "small", "position": "center", "rng_state": attrs["rng_state"] + i},
                      size).resize((cell, cell))
        image.paste(tile, (i * cell, (size - cell) // 2))
    return image


def image_files(folder: str | Path, image_ids) -> dict:
    """image_id -> file in ``folder``: named by the id (``12.png``) or as COCO names it (``..._000000000012.jpg``)."""
    folder = Path(folder)
    files = {}
    by_stem = {p.stem: p for p in folder.iterdir() if p.is_file()}
    for image_id in set(image_ids):
        match = by_stem.get(str(image_id)) or next(
            (p for stem, p in by_stem.items() if stem.endswith(f"_{int(image_id):012d}")), None)
        if match is None:
            raise FileNotFoundError(f"{folder}: no image file for image_id {image_id}")
        files[image_id] = match
    return files
