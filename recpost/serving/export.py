"""``recpost export``: a trained policy as a self-contained model folder (``recpost.serving.pretrained.ModelFolder``).

The scorer is a ``torch.export`` program (``torch.export.save``), not TorchScript: on torch 2.13
``torch.jit.trace`` is deprecated and bakes the traced history length into SASRec's position
arithmetic, while ``torch.export`` keeps the batch size and the history length (1..max_len) symbolic
and saves a program that ``torch.export.load`` runs without recpost. Nothing here knows a backbone's
layers: the program is whatever ``Backbone.encode`` and ``score_columns`` do, and the inputs it takes
(items, and ratings / timestamps if the backbone reads them) are read off the exported graph.

The item map (internal id -> source id) is not in the checkpoint, only its hash: it is rebuilt from the
run's data config (the ``config.yaml`` next to ``checkpoints/``), and the hash must match.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from recpost import __version__
from recpost.models.checkpoint import backbone_config, check_catalog, is_mf_rating_model, policy_backbone, read_checkpoint
from recpost.data import RecDataModule
from recpost.core.errors import RecpostError
from recpost.models import Backbone
from recpost.core.files import atomic_folder
from recpost.models.checkpoint import STAMP, weights_sha256
from recpost.serving.pretrained import FORMAT, FORMAT_VERSION, SCORER_INPUTS, ModelFolder
from recpost.core.runs import RunFolder

# Graph uses of an input that read only its shape, not its values (an input used only so is not needed).
SHAPE_ONLY_OPS = {torch.ops.aten.sym_size.int, torch.ops.aten._assert_tensor_metadata.default}
EXAMPLE_BATCH = 3


class CatalogScorer(nn.Module):
    """Left-padded histories -> fp32 scores of the whole catalog ``[B, n_items + 1]`` after the last position
    (column 0, padding, is -inf; nothing else masked). Takes the tensors named by ``inputs``, in that order."""

    def __init__(self, backbone: Backbone, inputs: tuple[str, ...]) -> None:
        super().__init__()
        self.backbone = backbone
        self.inputs = inputs

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        given = dict(zip(self.inputs, tensors))  # each [B, L]
        hidden = self.backbone.encode(given["items"], given.get("ratings"), given.get("timestamps"))[:, -1]  # [B, d]
        return self.backbone.score_columns(hidden, slice(None))  # [B, n_items + 1]


def export(ckpt_path: str, out: str, config: list[str] | str | None = None, overwrite: bool = False) -> None:
    """Write a trained policy as a model folder: safetensors weights, JSON config and item map, a torch.export scorer.

    The folder serves without recpost's data or checkpoint: ``recpost recommend --model OUT``, or
    ``recpost.load_pretrained(OUT)`` in Python, or ``torch.export.load(OUT/scorer.pt2)`` with torch alone.

    Args:
        ckpt_path: a policy checkpoint (the best.ckpt of a ``recpost fit`` run: SFT, ExpSFT, PPO, DPO).
        out: the folder to write.
        config: the run's fit config (or a list of them, composed in order), to rebuild its item map (the
            source's item ids); default: the config.yaml of the checkpoint's run folder.
        overwrite: replace ``out`` if it already holds files.
    """
    target = Path(out).expanduser()
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise RecpostError(f"--out {target} already exists; choose another folder or pass --overwrite true")
    ckpt = read_checkpoint(ckpt_path, "--ckpt_path")
    hparams = ckpt.get("hyper_parameters", {})
    if "prior_count" in hparams or is_mf_rating_model(hparams, ckpt["state_dict"]):
        raise RecpostError(f"--ckpt_path {ckpt_path} is a reward model (it predicts ratings, not next items); "
                           "export a policy: SFT, ExpSFT, PPO or DPO")
    configs = run_configs(ckpt_path, config)
    item_ids = source_item_ids(configs, hparams, ckpt_path)
    backbone = policy_backbone(ckpt, f"--ckpt_path {ckpt_path}")  # eval mode: the program is for inference
    max_len = hparams["max_len"]
    program, inputs = export_scorer(backbone, max_len)
    folder_config = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "recpost_version": __version__, "torch_version": torch.__version__,
        "method": hparams.get("_class_path") or _config_class_path(configs),
        # the checkpoint's name and the hash of its weights, not its path: the folder is meant to be moved
        "checkpoint": {"name": Path(ckpt_path).name, "weights_sha256": checkpoint_weights_sha256(ckpt)},
        "backbone": dataclasses.asdict(backbone_config(hparams)),
        "n_items": backbone.n_items, "max_len": max_len, "item_map_hash": hparams.get("item_map_hash", ""),
        "scorer": {"format": "torch.export", "inputs": list(inputs),
                   "output": "fp32 scores [B, n_items + 1] after left-padded [B, L] inputs (L <= max_len); column 0 is -inf"},
    }
    _write_atomically(target, overwrite, backbone, folder_config, item_ids, program)
    print(f"exported {folder_config['method']} ({backbone.n_items} items, scorer inputs: {', '.join(inputs)}) to {target}")


def run_configs(ckpt_path: str, config: list[str] | str | None) -> list[Path]:
    """The config files that rebuild the checkpoint's data: ``config``, else the run folder's config.yaml."""
    if config:
        return [Path(c).expanduser() for c in ([config] if isinstance(config, str) else config)]
    ckpt = Path(ckpt_path).expanduser().resolve()
    run = RunFolder(ckpt.parent.parent)
    if ckpt.parent.name != run.checkpoints.name or not run.config.is_file():
        raise RecpostError(f"--ckpt_path {ckpt_path} is not inside a run folder with a config.yaml; pass the "
                           "run's fit config(s) with --config so its item ids can be recovered")
    return [run.config]


def source_item_ids(configs: list[Path], hparams: dict, ckpt_path: str) -> list[str]:
    """The source's id of every internal item 1..n_items, from the data the configs describe (its catalog
    must be the checkpoint's)."""
    datamodule = RecDataModule.from_configs(configs)
    check_catalog(hparams, datamodule.item_map_hash, f"--ckpt_path {ckpt_path}")
    if datamodule.n_items != hparams.get("n_items"):
        raise RecpostError(f"--ckpt_path {ckpt_path} scores {hparams.get('n_items')} items but the data of "
                           f"{[str(c) for c in configs]} has {datamodule.n_items}; pass the run's own config")
    return [str(i) for i in datamodule.original_item_ids(np.arange(1, datamodule.n_items + 1))]


def example_inputs(backbone: Backbone, batch: int, length: int) -> dict[str, torch.Tensor]:
    """Deterministic histories ``[batch, length]`` of real items (varied ratings, increasing timestamps)."""
    steps = torch.arange(batch * length).reshape(batch, length)
    return {
        "items": steps * 7 % backbone.n_items + 1,
        "ratings": (steps % 5 + 1).float(),
        "timestamps": 1_000_000 + 3_600 * steps,
    }


def export_scorer(backbone: Backbone, max_len: int) -> tuple[torch.export.ExportedProgram, tuple[str, ...]]:
    """The catalog scorer as a ``torch.export`` program with a symbolic batch size and history length
    (1..``max_len``), and the inputs it takes: the items, plus those of ratings / timestamps whose values the
    exported graph reads."""
    examples = example_inputs(backbone, EXAMPLE_BATCH, min(2, max_len))
    dims = {0: torch.export.Dim("batch", min=1), 1: torch.export.Dim("length", min=1, max=max_len)}

    def run_export(inputs: tuple[str, ...]) -> torch.export.ExportedProgram:
        try:
            return torch.export.export(CatalogScorer(backbone, inputs).eval(), tuple(examples[n] for n in inputs),
                                       dynamic_shapes=((dims,) * len(inputs),))
        except Exception as exc:  # noqa: BLE001 - any tracing failure: the backbone cannot be exported as it is
            raise RecpostError(f"torch.export cannot export the {type(backbone).__name__} scorer "
                               f"({str(exc).splitlines()[0]})") from None

    program = run_export(SCORER_INPUTS)
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in program.graph_signature.user_inputs]
    read = tuple(name for name, node in zip(SCORER_INPUTS, placeholders)
                 if name == "items" or any(use.target not in SHAPE_ONLY_OPS for use in node.users))
    if read != SCORER_INPUTS:
        program = run_export(read)
    return program, read


def _check_program(path: Path, backbone: Backbone, inputs: tuple[str, ...], max_len: int) -> None:
    """The saved program, loaded back, scores a batch of another shape exactly as the backbone does."""
    examples = example_inputs(backbone, EXAMPLE_BATCH + 2, max_len)
    args = tuple(examples[n] for n in inputs)
    with torch.no_grad():
        expected = CatalogScorer(backbone, inputs).eval()(*args)
        got = torch.export.load(path).module()(*args)
    if not torch.equal(expected, got):
        raise RecpostError(f"the exported scorer {path} does not reproduce the backbone's scores "
                           f"(max difference {(expected - got).nan_to_num().abs().max().item():.3g}); report this")


def _config_class_path(configs: list[Path]) -> str | None:
    """``model.class_path`` of the last config that names one (the method, for checkpoints without it)."""
    found = None
    for path in configs:
        model = (yaml.safe_load(path.read_text()) or {}).get("model") or {}
        found = model.get("class_path", found) if isinstance(model, dict) else found
    return found


def _write_atomically(target: Path, overwrite: bool, backbone: Backbone, config: dict, item_ids: list[str],
                      program: torch.export.ExportedProgram) -> None:
    """Write the folder under a temporary name and rename it into place (``recpost.core.files.atomic_folder``):
    an interrupted or failed export never leaves a folder that looks complete, and an overwritten one stays
    as it was until the new one is whole."""
    if target.exists() and not target.is_dir():
        target.unlink()  # --overwrite of a file (checked before anything was written)
    with atomic_folder(target, replace=True) as path:
        tmp = ModelFolder(path)
        save_file({k: v.detach().clone().contiguous() for k, v in backbone.state_dict().items()}, tmp.weights,
                  metadata={"format": "pt"})
        tmp.config.write_text(json.dumps(config, indent=2) + "\n")
        tmp.item_map.write_text(json.dumps({str(i + 1): item for i, item in enumerate(item_ids)}) + "\n")
        tmp.readme.write_text(usage_note(config))
        torch.export.save(program, tmp.scorer)
        _check_program(tmp.scorer, backbone, tuple(config["scorer"]["inputs"]), config["max_len"])
        _readable_by_all(tmp)


def checkpoint_weights_sha256(ckpt: dict) -> str:
    """The SHA-256 of the checkpoint's weights: the one it was stamped with (checked by ``read_checkpoint``)."""
    stamped = ckpt.get(STAMP)
    return stamped["weights_sha256"] if isinstance(stamped, dict) else weights_sha256(ckpt["state_dict"])


def usage_note(config: dict) -> str:
    """The folder's README.md: what it holds and the three ways to use it."""
    needs = [n for n in config["scorer"]["inputs"] if n != "items"]
    history = '{"user_id": "u1", "items": ["50", "172"]' + "".join(
        f', "{n}": {[4.0, 5.0] if n == "ratings" else [1700000000, 1700003600]}' for n in needs) + "}"
    reads = ("Each history needs its " + " and ".join(needs) + "; " if needs else "") + (
        "timestamps are unix seconds (or ISO dates; ms, us or ns are detected), as in training." if "timestamps" in needs
        else "")
    return f"""# {config["method"]} recommender (exported by recpost {config["recpost_version"]})

Top-k items for new users' histories, over {config["n_items"]:,} items (the last {config["max_len"]} items of a
history are read). Exported from the checkpoint `{config["checkpoint"]["name"]}` (weights SHA-256
`{config["checkpoint"]["weights_sha256"][:16]}...`). {reads}

| file | what |
|---|---|
| `model.safetensors` | the backbone's weights |
| `config.json` | backbone settings, catalog size, `max_len`, the scorer's inputs, versions |
| `item_map.json` | internal item id (1..n_items) -> the data's item id |
| `scorer.pt2` | a `torch.export` program: left-padded histories -> scores of every item |

With recpost, from a shell (histories as JSON lines, one user each, or a CSV `user_id,item_id[,timestamp,rating]`):

    echo '{history}' > histories.jsonl
    recpost recommend --model <this folder> --histories histories.jsonl --k 10

In Python:

    import recpost
    model = recpost.load_pretrained("<this folder>")
    model.recommend([{history}], k=10)

With torch alone (internal ids, left-padded with 0; column 0 of the scores is padding):

    import torch
    scorer = torch.export.load("<this folder>/scorer.pt2").module()
    scores = scorer({", ".join(f"{n}[B, L]" for n in config["scorer"]["inputs"])})  # -> [B, n_items + 1]
"""


def _readable_by_all(folder: ModelFolder) -> None:
    """The permissions of an ordinary folder (a temporary one and safetensors' files are private to the user)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder.path, 0o777 & ~umask)
    for path in folder.files:
        os.chmod(path, 0o666 & ~umask)
