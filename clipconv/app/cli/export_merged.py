"""`scripts/export_merged.py`: fold a trained checkpoint of a mergeable adapter kind (LoRA, DoRA, BitFit: those
registered with `mergeable=True`) into a plain open_clip state dict."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

from clipconv.adapters import mergeable_kinds
from clipconv.app.cli.common import bad_input_errors, fail, plain_warnings
from clipconv.app.cli.options import add_runtime_args, apply_runtime, runtime_from
from clipconv.backbone import load_backbone, resolve_device
from clipconv.checkpoint import read_metadata
from clipconv.merge import merged_state_dict, model_metadata, save_merged
from clipconv.methods.finetune import load_classifier

HEAD_SUFFIX = ".head.safetensors"
#: the merge runs on the CPU unless --device says otherwise (it is one pass over the weights)
MERGE_RUNTIME = {"device": "cpu"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Merge a trained adapter checkpoint whose adapters are linear in the backbone weights "
                    f"({', '.join(mergeable_kinds())}) into the backbone: writes OUTPUT, a plain open_clip state dict "
                    "of the whole CLIP model that records its open_clip config (load it with "
                    "clipconv.merge.load_merged_model(OUTPUT), or open_clip.create_model(MODEL, pretrained=OUTPUT) "
                    f"for a model open_clip knows by name), and OUTPUT without its suffix + '{HEAD_SUFFIX}', the "
                    "classification head (head.weight, head.bias; logits = logit_scale · head(normalize(model.encode_image(x))), "
                    "logit_scale and class ids in its metadata). The other kinds (Convpass, AdaptFormer, Adapter, "
                    "VPT) add computations of their own and are refused. Existing files are never overwritten.")
    parser.add_argument("--checkpoint", required=True, help="adapter.safetensors of a training run, or the run folder")
    parser.add_argument("--output", required=True, help="the merged open_clip state dict to write (.safetensors)")
    parser.add_argument("--model", help="open_clip model name or config JSON (default: the one the checkpoint records)")
    parser.add_argument("--pretrained", help="weights tag or file (default: the ones the checkpoint records)")
    parser.set_defaults(_runtime=add_runtime_args(parser, device=True))
    return parser


def head_path(output: Path) -> Path:
    return output.with_name(output.name[: -len(output.suffix)] + HEAD_SUFFIX if output.suffix else output.name + HEAD_SUFFIX)


def main(argv: Optional[Sequence[str]] = None) -> int:
    plain_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    runtime = runtime_from(args, args._runtime, parser, defaults=MERGE_RUNTIME)
    apply_runtime(runtime)

    checkpoint = Path(args.checkpoint)
    if checkpoint.is_dir():
        checkpoint = checkpoint / "adapter.safetensors"
    output = Path(args.output)
    if output.suffix != ".safetensors":
        fail(f"--output {args.output}: give a path ending in .safetensors")
    for path in (output, head_path(output)):
        if path.exists():
            fail(f"--output {args.output}: '{path}' already exists; merged weights are never overwritten — "
                 "choose another --output")
    with bad_input_errors():
        meta = read_metadata(checkpoint)
        kind = (meta.get("adapter") or {}).get("kind")
        if kind not in mergeable_kinds():
            fail(f"--checkpoint {checkpoint}: adapter kind '{kind}' cannot be merged into the backbone (it adds "
                 f"its own computation); only {mergeable_kinds()} can — evaluate it with clipconv-eval instead")
        source = meta.get("source") or {}
        model = args.model or source.get("model")
        pretrained = args.pretrained or source.get("pretrained")
        if not model:
            fail(f"--checkpoint {checkpoint} records no model; give --model and --pretrained")
        backbone = load_backbone(model, None if pretrained in (None, "none") else pretrained,
                                 device=resolve_device(runtime.device),
                                 quick_gelu=meta["backbone"].get("quick_gelu"))
        classifier, _ = load_classifier(checkpoint, backbone)
        visual = merged_state_dict(classifier.visual)
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in backbone.model.state_dict().items()}
        expected = {name[len("visual."):] for name in state if name.startswith("visual.")}
        if set(visual) != expected:
            fail(f"merged image encoder keys differ from the plain model's: {sorted(set(visual) ^ expected)[:5]}")
        state.update({f"visual.{name}": tensor for name, tensor in visual.items()})
        info = {"merged_from": str(checkpoint.resolve()), "adapter": json.dumps(meta.get("adapter")),
                "backbone": json.dumps(meta.get("backbone")), **model_metadata(backbone)}
        save_merged(state, output, info)
        head = {"head.weight": classifier.head.weight, "head.bias": classifier.head.bias}
        save_merged(head, head_path(output), {**info, "logit_scale": repr(classifier.logit_scale),
                                              "class_ids": json.dumps(meta.get("class_ids") or [])})
    print(f"merged {kind} → {output} (+ head {head_path(output)})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
