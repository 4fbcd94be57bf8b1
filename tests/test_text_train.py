"""A text-conditioned expert trains like any other: a DiT with cross-attention on glyph captions
(what the renderer drew), a tiny frozen CLIP text encoder made from those captions, one process
(``python -m ddm.train``); killed after a commit, it resumes to the uninterrupted run's weights.
Bad text settings fail before any training, saying what to set."""

import json
import os

import numpy as np
import pytest
import torch

from ddm.data.ingest import IngestConfig, ingest
from ddm.data.partition import PartitionConfig, partition
from ddm.data.shards import Dataset
from ddm.store import Store
from tests.helpers import assert_same_weights, exported, summary
from tests.test_train import fresh, run_cli

STORED = "model.text.embeddings=store"
TEXT = ["model.arch=DiT-Tiny/4", "model.data_shape=[1,16,16]", "model.num_classes=0", "model.text.dim=32",
        "model.text.length=24"]  # fmt: skip


GLYPHS = dict(source="glyphs:384", shard_size=192, caption="describe")


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    """A tiny CLIP text encoder made from glyph captions, and those glyphs with their captions and
    the encoder's embeddings of them (float32) in a store, in 2 partitions: jobs can read the
    embeddings (model.text.embeddings=store) or encode the captions themselves (job)."""
    from ddm.data.sources import open_source
    from ddm.models.text_encoder import make_tiny

    root = tmp_path_factory.mktemp("text")
    captions = [caption for _, _, caption in open_source(IngestConfig(**GLYPHS)).generate()]
    encoder = make_tiny(str(root / "encoder"), captions, kind="clip", hidden_size=32, layers=1, max_length=24)
    store = Store(str(root / "store"))
    ingest(IngestConfig(**GLYPHS, text_encoder=encoder, text_dtype="float32"), store)
    partition(PartitionConfig(num_partitions=2, num_fine=16), store)
    return root / "store", encoder


@pytest.fixture(scope="module")
def text_ensemble(captioned, tmp_path_factory):
    """Two text experts and a router that reads the caption too, on the captioned glyphs (their
    embeddings read from the store), assembled."""
    from ddm.ensemble.assemble import assemble

    prepared, encoder = captioned
    root = tmp_path_factory.mktemp("text-ensemble")
    store = fresh(prepared, root, "store")
    for k in (0, 1):
        args = [*TEXT, f"model.text.encoder={encoder}", f"partition={k}", "steps=8", "checkpoint.every=4", STORED]
        summary(run_cli(store, *args))
    text = [f"model.text.{k}={v}" for k, v in (("encoder", encoder), ("dim", 32), ("length", 24))] + [STORED]
    router = ["job=router", "model.arch=DiT-Micro/4", "model.data_shape=[1,16,16]", "model.num_classes=0", "steps=4"]
    summary(run_cli(store, *router, *text))  # p(k | x_t, t, caption)
    return store, assemble(Store(store), "top1")


def test_a_text_expert_trains_and_resumes_to_the_uninterrupted_weights(captioned, text_ensemble, tmp_path):
    """A job encoding its captions itself, killed after a commit and resumed, ends with the weights
    of the ensemble's expert 0: trained uninterrupted on the embeddings stored at ingest (the two
    placements train the same weights, and the resume is exact)."""
    prepared, encoder = captioned
    args = [*TEXT, f"model.text.encoder={encoder}", "steps=8", "checkpoint.every=4"]  # embeddings: job
    straight = text_ensemble[0]  # its expert 0: the same job, uninterrupted, on the stored embeddings
    s = json.load(open(os.path.join(straight, "experts/00/summary.json")))
    assert s["step"] == 8 and s["final_loss"] > 0 and s["startup"]["resumed_from"] is None
    crashed = fresh(prepared, tmp_path, "crashed")
    out = run_cli(crashed, *args, env={"DDM_FAULT": "step:6", "DDM_FAULT_ONCE": str(tmp_path / "once")})
    assert out.returncode == -9
    s2 = summary(run_cli(crashed, *args))
    assert s2["startup"]["resumed_from"] == 4
    assert_same_weights(exported(straight), exported(crashed))

    # The export says which encoder it expects, and rebuilds into a model that reads captions.
    from ddm.models.exports import build_from_export
    from ddm.models.text_encoder import TextEncoder

    config = json.load(open(os.path.join(straight, "experts/00/export/config.json")))
    assert config["architecture"]["family"] == "text-dit"
    assert config["architecture"]["text"]["encoder"] == encoder and config["architecture"]["text"]["length"] == 24
    assert config["text_encoder"]["kind"] == "clip" and len(config["text_encoder"]["sha256"]["model.safetensors"]) == 64
    model = build_from_export(config)
    model.load_state_dict(exported(straight))
    enc = TextEncoder.load(config["architecture"]["text"]["encoder"], config["architecture"]["text"]["length"])
    v = model.eval()(torch.randn(2, 1, 16, 16), torch.full((2,), 0.5), enc.encode(["digit 3 in cmr10", ""]))
    assert v.shape == (2, 1, 16, 16) and v.abs().sum() > 0


@pytest.mark.parametrize(
    "change,match",
    [
        (["model.text.dim=48"], "makes 32-wide embeddings: set model.text.dim=32"),
        (["model.text.length=40"], "has 24 positions: set model.text.length<=24"),
        (["model.num_classes=62"], "takes captions instead of class labels: set num_classes=0"),
        (["model.text.dim=0"], "needs model.text.dim and model.text.length"),
    ],
)
def test_bad_text_settings_fail_before_training(captioned, change, match):
    from ddm.core.config import load
    from ddm.train.job import JobConfig, check_inputs

    prepared, encoder = captioned
    with pytest.raises(ValueError, match=match):
        check_inputs(load(JobConfig, None, [f"store={prepared}", "partition=0", *TEXT, f"model.text.encoder={encoder}",
                                            *change]))  # fmt: skip


def test_a_text_job_on_a_dataset_without_captions_is_refused(captioned, tmp_path):
    from ddm.core.config import load
    from ddm.train.job import JobConfig, check_inputs

    _, encoder = captioned
    store = Store(str(tmp_path / "plain"))
    ingest(IngestConfig(source="glyphs:64", shard_size=64), store)
    partition(PartitionConfig(num_partitions=2, num_fine=8), store)
    with pytest.raises(ValueError, match="has no captions: ingest it with caption="):
        check_inputs(
            load(JobConfig, None, [f"store={store.url}", "partition=0", *TEXT, f"model.text.encoder={encoder}"])
        )


def test_a_text_ensemble_samples_from_prompts_with_guidance_per_prompt(text_ensemble, tmp_path):
    from ddm.ensemble.sample import sample
    from ddm.ensemble.settings import SampleConfig

    store, desc = text_ensemble
    assert desc["text"]["dim"] == 32 and desc["text"]["length"] == 24 and desc["num_classes"] == 0
    router = json.load(open(os.path.join(store, "router/export/config.json")))
    assert router["architecture"]["family"] == "text-dit-router" and router["architecture"]["text"]["dim"] == 32
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "uppercase R in dejavu serif, large, thick strokes, upright\n\n4.0\tdigit 3 in dejavu sans, small\n"
    )
    cfg = dict(num_samples=6, steps=3, batch_size=4, guidance=2.0, seed=7, sampler="euler")
    meta = sample(Store(store), SampleConfig(**cfg, prompts_file=str(prompts), name="p"))
    rows = json.loads(Store(store).read_bytes("samples/p/prompts.json"))
    assert [r["guidance"] for r in rows] == [2.0, 4.0] * 3 and rows[1]["prompt"] == "digit 3 in dejavu sans, small"
    x = np.load(os.path.join(store, "samples/p/samples.npy"))
    assert x.shape == (6, 1, 16, 16) and np.isfinite(x).all()
    assert meta["expert_forwards_per_sample"] == 2 * 3  # guided: two branches per step, one expert (top-1)
    # The same prompts and seed give the same images; another prompt gives others.
    assert sample(Store(store), SampleConfig(**cfg, prompts_file=str(prompts), name="p")) == meta  # done: kept
    again = sample(Store(store), SampleConfig(**cfg, prompts_file=str(prompts), name="p2"))
    assert again["dir"] != meta["dir"] and np.array_equal(np.load(os.path.join(store, "samples/p2/samples.npy")), x)
    sample(Store(store), SampleConfig(**cfg, prompts=["lowercase q in stixgeneral"], name="q"))
    assert not np.allclose(np.load(os.path.join(store, "samples/q/samples.npy")), x)
    with pytest.raises(ValueError, match=r"text-conditioned .*: give prompts=\[...\] or prompts_file="):
        sample(Store(store), SampleConfig(**cfg, name="none"))
    prompts.write_text("digit 3 in dejavu sans, small\n")  # the same name, other prompts: refused
    with pytest.raises(ValueError, match="holds samples made with other settings"):
        sample(Store(store), SampleConfig(**cfg, prompts_file=str(prompts), name="p"))
    prompts.write_text("strong\tdigit 3\n")
    with pytest.raises(ValueError, match="line 1: 'strong' before the tab is not a guidance scale"):
        sample(Store(store), SampleConfig(**cfg, prompts_file=str(prompts), name="bad"))


def test_experts_of_one_ensemble_share_their_text_encoder():
    from ddm.ensemble.assemble import _text_of

    def expert(d, text):
        return {"dir": d, "config": {"architecture": {"text": text} if text else {}}}

    clip = {"encoder": "/m/clip", "dim": 32, "length": 24, "pooled": True}
    assert _text_of([expert("experts/00", clip), expert("experts/01", clip)]) == {
        k: clip[k] for k in ("encoder", "dim", "length")
    }
    assert _text_of([expert("experts/00", None), expert("experts/01", None)]) is None
    with pytest.raises(ValueError, match="experts/00 is not text-conditioned but experts/01 is"):
        _text_of([expert("experts/00", None), expert("experts/01", clip)])
    with pytest.raises(ValueError, match="experts/01 reads captions with '/m/t5' .* share their text encoder"):
        _text_of([expert("experts/00", clip), expert("experts/01", {**clip, "encoder": "/m/t5"})])


def test_prompts_for_a_class_ensemble_are_refused():
    from ddm.ensemble.sample import prompted
    from ddm.ensemble.settings import SampleConfig

    with pytest.raises(ValueError, match="not text-conditioned: it takes no prompts"):
        prompted({"num_classes": 10}, SampleConfig(prompts=["a cat"]), "cpu")


def test_a_text_ensemble_is_evaluated_on_prompts_with_their_adherence(text_ensemble):
    """``ddm evaluate`` samples the captions of a draw of data images as prompts and reports, per
    rule, the distance and the prompt adherence; the adherence measure itself finds the prompts'
    classes in the images they describe and is at chance on images of other prompts."""
    from ddm.distributed.parallel import resolve_device
    from ddm.ensemble.sample import LABELS, stream
    from ddm.eval.evaluate import Judge, evaluate
    from ddm.eval.settings import EvalConfig

    store, desc = text_ensemble
    rules = ["top1", "full", "oracle"]
    cfg = EvalConfig(num_samples=64, steps=2, batch_size=64, rules=rules, guidance=2.0, sampler="euler", router_t=[0.5],
                     router_samples=64)  # fmt: skip
    r = evaluate(Store(store), cfg)
    assert [v["rule"] for v in r["rules"]] == ["top-1", "full", "oracle"]
    assert all(0.0 <= v["prompt_adherence"] <= 1.0 for v in r["rules"]) and r["prompts"]["adherence_chance"] < 0.1
    assert all(v["expert_forwards_per_sample"] in (4, 8) for v in r["rules"])  # 2 steps x 2 branches (x 2: full)
    assert "Prompt adherence" in Store(store).read_bytes(f"{r['dir']}/report.md").decode()
    seeded = cfg.seeded()
    judge = Judge(Store(store), seeded, desc, resolve_device("cpu"))
    pick = torch.randint(len(judge.x_data), (64,), generator=stream(seeded.seed, LABELS))  # the Judge's draw
    assert judge.prompts.prompts == [judge.captions[int(i)] for i in pick]  # the prompts describe these images
    right, wrong = judge.adherence(judge.x_data[pick]), judge.adherence(judge.x_data[pick.roll(1)])
    assert right["accuracy"] > 0.5 and wrong["accuracy"] < right["accuracy"] / 2, (right, wrong)
    # Retrieval: the data images find their own captions far above chance (1/10), other images do not.
    info = r["prompts"]
    assert info["retrieval_chance"] == 0.1 and info["retrieval_data"] > 0.3, info
    assert right["retrieval"] > 0.5 and wrong["retrieval"] < 0.25, (right, wrong)
    assert all(0.0 <= v["prompt_retrieval"] <= 1.0 for v in r["rules"])


def test_held_out_prompts_come_from_data_no_model_trained_on(text_ensemble):
    """``evaluate.held_out``: the prompts are the captions of other glyphs (another seed), and prompt
    adherence checks their classes; the training data itself and the oracle rule are refused."""
    from ddm.data.sources import held_out_prompts
    from ddm.eval.evaluate import evaluate
    from ddm.eval.settings import EvalConfig

    store, _ = text_ensemble
    cfg = dict(num_samples=32, steps=2, batch_size=32, rules=["top1"], sampler="euler", router_t=[0.5],
               router_samples=32, held_out="glyphs:16")  # fmt: skip
    r = evaluate(Store(store), EvalConfig(**cfg))
    manifest = Store(store).manifest("data")
    prompts, labels = held_out_prompts(manifest, "glyphs:16", 1, 32)
    assert prompts[:16] == prompts[16:] and len(set(prompts)) == 16  # 16 items, cycled
    training = set(Dataset(Store(store)).read_shard(0).captions) | set(Dataset(Store(store)).read_shard(1).captions)
    assert not set(prompts) & training and r["prompts"]["examples"] == prompts[:8]
    assert r["prompts"]["source"].startswith("held out: glyphs:16") and 0 <= r["rules"][0]["prompt_adherence"] <= 1
    assert r["prompts"]["adherence_chance"] == max(labels.count(y) for y in labels) / 32
    with pytest.raises(ValueError, match="draws the training data's own images .* choose another held_out_seed"):
        held_out_prompts(manifest, "glyphs:16", 0, 32)
    parquet = {**manifest, "ingest": {**manifest["ingest"], "source": "/data/train.parquet"}}
    with pytest.raises(ValueError, match="is the dataset's own source: give files no model trained on"):
        held_out_prompts(parquet, "/data/train.parquet/", 1, 32)
    with pytest.raises(ValueError, match="the oracle rule routes each sample to its image's partition"):
        EvalConfig(**{**cfg, "rules": ["top1", "oracle"]})


def test_a_text_student_must_read_the_ensembles_captions(text_ensemble):
    """A distilled student of a text ensemble reads captions with the experts' encoder (``ddm run``
    distils one: tests/test_text_run.py); a student without text, or with another length, is refused."""
    from ddm.core.config import load
    from ddm.train.job import JobConfig, check_inputs, with_teacher

    store, desc = text_ensemble
    student = [f"store={store}", "job=distill", "model.arch=DiT-Tiny/4", "model.num_classes=0",
               "model.data_shape=[1,16,16]"]  # fmt: skip
    with pytest.raises(ValueError, match=r"but the student reads none: set model.text.encoder=.* model.text.dim=32"):
        check_inputs(load(JobConfig, None, student))
    text = [f"model.text.encoder={desc['text']['encoder']}", "model.text.dim=32"]  # embeddings: job
    with pytest.raises(ValueError, match="set model.text.encoder=.* model.text.length=24"):
        check_inputs(load(JobConfig, None, [*student, *text, "model.text.length=16"]))
    check_inputs(with_teacher(load(JobConfig, None, [*student, *text, "model.text.length=24", STORED])))


def test_embeddings_computed_at_ingest_are_the_encoders(captioned, tmp_path):
    """The stored embeddings (float32) are exactly what the encoder gives the job (the placements
    train the same weights: the resume test above); float16 storage costs what the manifest says."""
    from ddm.models.text_encoder import TextEncoder

    prepared, encoder = captioned
    store = Store(str(prepared))
    m = store.manifest("data")["text_embeddings"]
    assert (m["dim"], m["length"], m["dtype"]) == (32, 24, "float32") and m["encoder"]["spec"] == encoder
    assert m["bytes_per_sample"] == 24 * 32 * 4 + 32 * 4 + 2
    shard = Dataset(store).read_shard(0, embeddings=True)
    emb = TextEncoder.load(encoder, 24).encode(shard.captions)
    assert np.array_equal(shard.text["text_tokens"], emb.tokens.numpy())
    assert np.array_equal(shard.text["text_lengths"], emb.mask.sum(1).numpy())
    assert np.array_equal(shard.text["text_pooled"], emb.pooled.numpy())
    half = Store(str(tmp_path / "half"))
    ingest(IngestConfig(source="glyphs:64", shard_size=64, caption="describe", text_encoder=encoder), half)
    assert half.manifest("data")["text_embeddings"]["bytes_per_sample"] == 24 * 32 * 2 + 32 * 2 + 2


def test_stored_embeddings_must_match_the_job(captioned, tmp_path):
    from ddm.core.config import load
    from ddm.train.job import JobConfig, check_inputs

    prepared, encoder = captioned
    base = [f"store={prepared}", "partition=0", *TEXT, f"model.text.encoder={encoder}", STORED]
    check_inputs(load(JobConfig, None, base))  # as made
    other = base[:-1] + [f"model.text.encoder={prepared}/../encoder/"]  # the same folder, named otherwise
    with pytest.raises(ValueError, match=r"were made by .*encoder' \(dim 32, length 24\).*use the same"):
        check_inputs(load(JobConfig, None, [*other, STORED]))
    bare = Store(str(tmp_path / "bare"))
    ingest(IngestConfig(source="glyphs:64", shard_size=64, caption="describe"), bare)
    partition(PartitionConfig(num_partitions=2, num_fine=8), bare)
    with pytest.raises(ValueError, match="has no stored caption embeddings: ingest it with text_encoder="):
        check_inputs(load(JobConfig, None, [f"store={bare.url}", *base[1:]]))
    with pytest.raises(ValueError, match="text_encoder embeds captions: set caption="):
        IngestConfig(source="glyphs:8", text_encoder=encoder)


def test_a_job_on_stored_embeddings_needs_no_encoder(tmp_path):
    """The encoder that made the stored embeddings may be out of reach (an island without the
    hub): a job reading them checks against the store alone; one that encodes needs the encoder."""
    import shutil

    from ddm.core.config import load
    from ddm.models.text_encoder import make_tiny
    from ddm.train.job import JobConfig, check_inputs

    encoder = make_tiny(str(tmp_path / "enc"), ["digit 3", "uppercase R"], hidden_size=32, layers=1, max_length=24)
    store = Store(str(tmp_path / "store"))
    ingest(IngestConfig(source="glyphs:64", shard_size=64, caption="describe", text_encoder=encoder), store)
    partition(PartitionConfig(num_partitions=2, num_fine=8), store)
    shutil.rmtree(encoder)
    base = [f"store={store.url}", "partition=0", *TEXT, f"model.text.encoder={encoder}"]
    check_inputs(load(JobConfig, None, [*base, STORED]))
    with pytest.raises(ValueError, match="is not a folder"):
        check_inputs(load(JobConfig, None, base))
