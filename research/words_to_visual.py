"""How much of a picture a prompt's words alone can regress: a ridge map from the word bag at `[IMG]`
(Emu.word_bags, the words since the latest picture, gated and summed) to the N visual embeddings of the
picture the prompt describes, fitted on 1500 training-seed scenes, against the model's own regression
(`m.regress`: the LLM's, plus its words' map with heads.words_to_visual). Scored as
eval/images.regression_retrieval: for 200 held-out prompts, is the regression nearest (L2) to a picture
of the prompt's objects (colour and shape, in order) among 300 held-out pictures?

Usage: python research/words_to_visual.py --model runs/demo/model
Prints one JSON object per object count (1, 2).
"""

import argparse
import json

import numpy as np
import torch

import nextmm
from nextmm.data.sample import Text
from nextmm.eval.images import held_out_scenes, objects_in_caption
from nextmm.worlds.shapes.evaluation import EVAL_SEED


def bags_at_img(m, captions: list[str]) -> np.ndarray:
    rows = []
    for caption in captions:
        encoded = m.builder.encode([Text(caption, target=False)], close=False)
        encoded.add([m.tokenizer.img_id])
        with torch.no_grad():
            rows.append(m.model.read(torch.tensor([encoded.ids]), None).word_bags[0, -1].numpy())
    return np.array(rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    args = parser.parse_args()
    m = nextmm.load(args.model)
    for objects in (1, 2):
        train = held_out_scenes(objects, 1500, seed=123)
        test = held_out_scenes(objects, 500, seed=EVAL_SEED)
        asked, gallery = test[:200], test[200:]
        pictures = m.embed_images([image for _, image in gallery]).flatten(1)
        named = lambda caption: tuple(tuple(o[1:]) for o in objects_in_caption(caption))  # noqa: E731

        def retrieval(regressed) -> float:
            nearest = torch.cdist(torch.as_tensor(regressed, dtype=torch.float), pictures).argmin(1).tolist()
            return round(float(np.mean([named(c) == named(gallery[i][0]) for (c, _), i in zip(asked, nearest)])), 4)

        x = np.c_[bags_at_img(m, [c for c, _ in train]), np.ones(len(train))]
        y = m.embed_images([image for _, image in train]).flatten(1).numpy()
        ridge = np.linalg.solve(x.T @ x + 1e-2 * np.eye(x.shape[1]), x.T @ y)
        words_alone = np.c_[bags_at_img(m, [c for c, _ in asked]), np.ones(len(asked))] @ ridge
        print(json.dumps({
            "objects": objects, "prompts": len(asked), "pictures": len(gallery),
            "model_regression_retrieval": retrieval(m.regress([c for c, _ in asked]).flatten(1)),
            "words_ridge_retrieval": retrieval(words_alone),
        }))


if __name__ == "__main__":
    main()
