"""Hugging Face ``datasets`` (built in memory, torch format) as train / query data everywhere.

A ``Dataset.from_dict(...).with_format("torch")`` yields dict rows of ``input_ids`` / ``attention_mask`` /
``labels``; its ``DataLoader`` collates them into the dict batches ifunc takes. Every path is compared with the
same examples passed as one in-memory dict batch.
"""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import ifunc
from ifunc import language
from ifunc.testing import TinyGPT, rel_error

datasets = pytest.importorskip("datasets", reason="datasets is not installed (pip install -e '.[test]')")

VOCAB, L, N = 11, 7, 7


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    model = TinyGPT(vocab=VOCAB, width=8, heads=2, layers=1, context=L).double().eval()
    loss = language.causal_lm_loss(lambda p, b: ifunc.call(model, p, b["input_ids"], b["attention_mask"]))
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (N, L), generator=gen)
    lengths = torch.tensor([7, 5, 7, 3, 6, 7, 4])
    mask = (torch.arange(L) < lengths[:, None]).long()  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    rows = {"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()}
    ds = datasets.Dataset.from_dict(rows).with_format("torch")
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return model, ifunc.params_of(model), loss, ds, batch


def test_collated_batches_are_dicts_of_tensors(lm):
    _, _, _, ds, batch = lm
    first = next(iter(DataLoader(ds, batch_size=3)))
    assert set(first) == {"input_ids", "attention_mask", "labels"} and first["input_ids"].dtype == torch.long
    torch.testing.assert_close(first["labels"], batch["labels"][:3])


@pytest.mark.parametrize("kind", ["generic", "kronecker"])
def test_attribute_self_influence_and_store(lm, kind, tmp_path):
    model, params, loss, ds, batch = lm
    loader = DataLoader(ds, batch_size=3)  # batches that do not align with the chunks
    if kind == "generic":
        ihvp = ifunc.ihvp_explicit(loss, params, loader, damping=0.1)
        ref_ihvp = ifunc.ihvp_explicit(loss, params, batch, damping=0.1)
    else:
        ihvp = ifunc.ihvp_ekfac(loss, params, loader, model=model, damping=0.1)
        ref_ihvp = ifunc.ihvp_ekfac(loss, params, batch, model=model, damping=0.1)
    ref = ifunc.attribute(loss, params, ref_ihvp, batch, batch)
    scores = ifunc.attribute(loss, params, ihvp, loader, loader, chunk_size=2)
    assert rel_error(scores, ref) < 1e-10
    path = tmp_path / "scores.h5"
    ifunc.attribute(loss, params, ihvp, loader, loader, chunk_size=2, out=path)
    stored = torch.as_tensor(np.asarray(ifunc.load_scores(path)))  # stores hold float32
    assert rel_error(stored.to(ref.dtype), ref) < 1e-6
    self_ref = ifunc.self_influence(loss, params, ref_ihvp, batch)
    assert rel_error(ifunc.self_influence(loss, params, ihvp, loader, chunk_size=4), self_ref) < 1e-10
    torch.testing.assert_close(self_ref, ref.diagonal())


def test_per_token_from_a_dataset(lm):
    model, params, loss, ds, batch = lm
    loader = DataLoader(ds, batch_size=4)
    ek = ifunc.ihvp_ekfac(loss, params, loader, model=model, damping=0.1)
    tok = ifunc.attribute(loss, params, ek, loader, loader, per_token=True, token_mask=language.token_mask)
    ref = ifunc.attribute(loss, params, ek, batch, batch, per_token=True, token_mask=language.token_mask)
    assert tok.shape == (N, N, L) and rel_error(tok, ref) < 1e-10
    assert torch.all(tok[:, batch["attention_mask"] == 0] == 0)  # padding: exactly 0
    assert rel_error(tok.sum(-1), ifunc.attribute(loss, params, ek, loader, loader)) < 1e-8


def test_raw_dataset_without_a_dataloader(lm):
    """A datasets.Dataset passed as it is is read as a map-style data set, in order, like its DataLoader."""
    model, params, loss, ds, batch = lm
    ihvp = ifunc.ihvp_identity(params)
    torch.testing.assert_close(
        ifunc.attribute(loss, params, ihvp, ds, ds), ifunc.attribute(loss, params, ihvp, batch, batch)
    )
