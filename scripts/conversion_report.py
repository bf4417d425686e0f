"""Per source model: Ghost-like modules seen by `ghostfast.convert`, converted, skipped (with reasons), its
bottlenecks wrapped whole or fused per module (ghostfast.nn.GhostBottleneck), and the
end-to-end relative error of the converted model against the eager original (eval mode, random weights and
BatchNorm statistics, fp32). Writes benchmarks/results/cpu-2core/conversion.csv (`make conversion-report`).

Sources: timm's GhostNet V1/V2/V3; the test suite's faithful copies of Huawei's GhostNetV3 modules (before and
after reparameterize()), ultralytics' GhostConv blocks (BN and fuse() forms), Ghost-ResNet's module and the
paper's module with k x k / strided primaries (tests/original_modules.py); ultralytics' own
DetectionModel('yolov8n-ghost.yaml') when ultralytics is importable."""
from __future__ import annotations

import argparse
import csv
import os
import sys
import warnings

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import ghostfast  # noqa: E402
from ghostfast.backends import GhostfastFallbackWarning  # noqa: E402
from ghostfast.models import randomize_batchnorm_, timm_ghostnet  # noqa: E402


def _sources():
    import original_modules as om
    import timm.models.ghostnet as tg

    def v3(reparam):
        m = om.HuaweiGhostNetV3Stack()
        if reparam:
            m.eval().reparameterize()
        return m

    def paper():
        return nn.Sequential(om.PaperGhostModule(3, 16, kernel_size=3, stride=2), om.PaperGhostModule(16, 24, 1, 3),
                             tg.GhostModule(24, 32, kernel_size=5, stride=2, act_layer=nn.SiLU),
                             tg.GhostModuleV2(32, 32, act_layer=nn.Hardswish))

    yield "timm ghostnet_100", lambda: timm_ghostnet("ghostnet_100", seed=3), (1, 3, 224, 224)
    yield "timm ghostnetv2_100", lambda: timm_ghostnet("ghostnetv2_100", seed=3), (1, 3, 224, 224)
    yield "timm ghostnetv3_100 (reparameterized)", lambda: timm_ghostnet("ghostnetv3_100", seed=3), (1, 3, 224, 224)
    yield "Huawei GhostNetV3 modules, before reparameterize()", lambda: v3(False), (2, 3, 32, 32)
    yield "Huawei GhostNetV3 modules ('ori', 'ori_shortcut_mul_conv15')", lambda: v3(True), (2, 3, 32, 32)
    yield "paper GhostModule k3 s2 / timm k5 s2 SiLU / V2 Hardswish", paper, (2, 3, 33, 30)
    yield "ultralytics GhostConv blocks (copy)", om.UltralyticsGhostNet, (1, 3, 64, 64)
    yield "ultralytics GhostConv blocks (copy) after fuse()", lambda: om.ultralytics_fuse(
        om.UltralyticsGhostNet().eval()), (1, 3, 64, 64)
    yield "Ghost-ResNet modules (copy)", om.TinyGhostResNet, (2, 3, 64, 64)
    try:
        from ultralytics.nn.tasks import DetectionModel
    except ImportError:
        return
    yield "ultralytics DetectionModel('yolov8n-ghost.yaml')", lambda: DetectionModel("yolov8n-ghost.yaml",
                                                                                     verbose=False), (1, 3, 320, 320)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "cpu-2core", "conversion.csv"))
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for name, build, shape in _sources():
        model = build()
        randomize_batchnorm_(model, torch.Generator().manual_seed(1))
        model.eval()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", GhostfastFallbackWarning)
            fast = ghostfast.convert(model, backend=args.backend)
            x = torch.randn(*shape)
            with torch.no_grad():
                ref, out = _first(model(x)), _first(fast(x))
        report = fast.ghostfast_report
        err = ((out - ref).norm() / ref.norm()).item()
        modules = [k for _, k in report.converted if "whole bottleneck" not in k]
        whole = len(report.converted) - len(modules)
        kinds = sorted({k.rsplit(".", 1)[-1] for k in modules})
        reasons = sorted({why for _, why in report.skipped})
        eager_calls = sorted({str(w.message) for w in caught if "running eager" in str(w.message)})
        rows.append({"source": name, "ghost_like": len(modules) + len(report.skipped),
                     "converted": len(modules), "skipped": len(report.skipped), "as": " ".join(kinds),
                     "bottlenecks": f"{whole} whole, {len(report.per_module)} per module",
                     "rel_error": f"{err:.2e}", "input": "x".join(map(str, shape)), "backend": args.backend,
                     "skip_reasons": " | ".join(reasons), "eager_at_call": len(eager_calls)})
        print(f"{name}: {rows[-1]['converted']}/{rows[-1]['ghost_like']} converted, rel. error {err:.2e}"
              + (f", eager at call: {eager_calls}" if eager_calls else ""))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    md = ["| source | Ghost-like modules | converted | as | bottlenecks | rel. error vs eager (fp32) | "
          "not converted: why |",
          "|---|---:|---:|---|---|---:|---|"]
    for r in rows:
        md.append(f"| {r['source']} | {r['ghost_like']} | {r['converted']} | {r['as'] or '-'} | {r['bottlenecks']} | "
                  f"{r['rel_error']} | "
                  f"{r['skip_reasons'] or '-'} |")
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
