"""Experiment configs: the papers' C4 recipes per model size, and the CPU benchmark."""

import pytest
from omegaconf import OmegaConf

from llm_pretrain import optim as optimizers
from llm_pretrain.config import check_experiment
from tests.conftest import REPO, SHARED_DATA, compose_cfg, run_cli

RECIPES = sorted(  # the C4 pretraining recipes (the CPU benchmarks and cl_* task runs are not)
    p.stem
    for p in (REPO / "conf" / "experiment").glob("*.yaml")
    if not p.stem.startswith(("cpu_bench", "cl_"))
)
SIZES = ["llama_60m", "llama_130m", "llama_350m", "llama_1b", "llama_7b"]


@pytest.mark.parametrize("experiment", RECIPES)
def test_every_recipe_composes_for_each_of_its_sizes(experiment):
    base = compose_cfg([f"experiment={experiment}"])
    sizes = list(base.experiment.sizes)
    assert set(sizes) <= set(SIZES) and sizes
    for size in sizes:
        cfg = compose_cfg([f"experiment={experiment}", f"model={size}"])
        resolved = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
        check_experiment(cfg)
        t = resolved["trainer"]
        assert (t["global_batch_size"], t["precision"], t["scheduler"]) == (512, "bf16", "cosine")
        assert t["warmup_steps"] * 10 == t["max_steps"]  # warmup is 10% of the steps
        assert resolved["eval"] == {
            "tokens": 10_000_000,
            "batch_size": t["micro_batch_size"],
            "compat": "galore",
        }
        assert resolved["data"]["source"] == "c4" and resolved["data"]["layout"] == "paper"
        if base.experiment.optimizer is not None:
            assert resolved["optimizer"]["name"] == base.experiment.optimizer


def test_galore_c4_takes_the_papers_settings_per_size():
    def pick(size):
        c = OmegaConf.to_container(
            compose_cfg(["experiment=galore_c4", f"model={size}"]), resolve=True
        )
        o, t = c["optimizer"], c["trainer"]
        return o["rank"], o["lr"], o["update_gap"], o["scale"], t["max_steps"], t["grad_clip"]

    assert pick("llama_60m") == (128, 0.01, 200, 0.25, 10_000, 0.0)
    assert pick("llama_1b") == (512, 0.01, 200, 0.25, 100_000, 0.0)
    assert pick("llama_7b") == (1024, 0.005, 500, 0.25, 150_000, 1.0)
    cfg = compose_cfg(["experiment=galore_c4", "model=llama_350m", "optimizer.rank=64"])
    assert cfg.optimizer.rank == 64  # the command line still wins


def test_the_default_size_is_60m_and_other_recipes_differ_where_the_papers_do():
    assert compose_cfg(["experiment=apollo_c4"]).model.name == "llama_60m"
    apollo = compose_cfg(["experiment=apollo_c4", "model=llama_130m"]).optimizer
    assert (apollo.name, apollo.rank, apollo.scale_type) == ("apollo", 192, "channel")
    mini = compose_cfg(["experiment=apollo_mini_c4", "model=llama_350m"]).optimizer
    assert (mini.rank, mini.scale_front, round(mini.scale**2)) == (1, False, 128)
    fira = compose_cfg(["experiment=fira_c4", "model=llama_1b"]).optimizer
    assert (fira.rank, fira.scale) == (512, 0.0625)
    seven = compose_cfg(["experiment=galore_8bit_c4"])
    assert (seven.model.name, seven.optimizer.name, seven.experiment.sizes.llama_7b.paper_ppl) == (
        "llama_7b",
        "galore_8bit",
        14.65,
    )


def test_a_size_without_a_recipe_is_refused_with_the_sizes_it_has(tmp_path):
    cfg = compose_cfg(["experiment=galore_c4", "model=llama_20m"])
    with pytest.raises(
        ValueError, match="has recipes for llama_60m, llama_130m, .*model=llama_20m"
    ):
        check_experiment(cfg)
    out = run_cli(["experiment=adamw_c4", "model=llama_9m"], cwd=tmp_path)  # before any download
    assert out.returncode != 0
    assert (
        "experiment=adamw_c4 has recipes for llama_60m, llama_130m, llama_350m, llama_1b, "
        "llama_7b, not for model=llama_9m; pick one of those with model=<name>"
    ) in out.stderr


def test_cpu_bench_gives_every_optimizer_the_same_data_schedule_and_budget():
    common = None
    pretraining = [n for n, m in optimizers.METHODS.items() if m.pretraining]
    assert "welore" not in pretraining and "gorp" not in pretraining  # fine-tuning methods
    for name in pretraining:
        cfg = OmegaConf.to_container(
            compose_cfg(["experiment=cpu_bench", "data=c4_sample", f"optimizer={name}"]),
            resolve=True,
        )
        same = {k: cfg[k] for k in ("model", "data", "trainer", "eval")}
        common = common or same
        assert same == common, name
        if "rank" in cfg["optimizer"] and name != "apollo_mini":
            assert cfg["optimizer"]["rank"] == 32, name  # hidden / 4
        for key in ("update_gap", "interval", "kappa"):
            assert cfg["optimizer"].get(key, 0) <= 50, (name, key)  # 6+ subspaces in 300 steps
    assert (common["model"]["name"], common["model"]["vocab_size"]) == ("llama_tiny", 2048)
    assert common["data"]["path"].endswith("/c4/c4_en_sample_2000.jsonl.gz")
    assert common["data"]["tokenizer"] == "outputs/tokenizers/c4_sample_sp2048.model"
    assert common["data"]["val_docs"] == 200
    t = common["trainer"]
    assert (t["max_steps"], t["global_batch_size"], common["data"]["seq_len"]) == (300, 16, 128)
    assert (t["eval_every"], common["eval"]["tokens"]) == (75, 30000)
    # the other corpus changes the data only
    builtin = OmegaConf.to_container(
        compose_cfg(["experiment=cpu_bench", "data=builtin", "optimizer=galore"]), resolve=True
    )
    assert {k: builtin[k] for k in ("model", "trainer", "eval")} == {
        k: common[k] for k in ("model", "trainer", "eval")
    }
    assert (builtin["data"]["source"], builtin["data"]["seq_len"]) == ("builtin", 128)


def test_the_start_up_comparison_keeps_its_old_settings():
    """experiment=cpu_bench_startup reruns the 100-step table of docs/benchmarks.md."""
    cfg = compose_cfg(["experiment=cpu_bench_startup", "optimizer=galore"])
    assert (cfg.model.name, cfg.trainer.max_steps, cfg.trainer.global_batch_size) == (
        "llama_20m",
        100,
        8,
    )
    assert (cfg.optimizer.rank, cfg.optimizer.update_gap) == (64, 25)
    assert cfg.data.tokenizer.endswith("/t5_tokenizer/spiece.model")


def test_cpu_bench_runs_a_method_on_c4(tmp_path):
    """One job of the protocol on the C4 sample's path, with a tokenizer trained the same way
    (on 60 of its documents, 20 held out) to keep the test short."""
    import gzip
    import itertools

    from llm_pretrain.tokenizer_training import train_sentencepiece

    docs = tmp_path / "c4.jsonl"
    with gzip.open(SHARED_DATA / "c4" / "c4_en_sample_2000.jsonl.gz", "rt") as f:
        docs.write_text("".join(itertools.islice(f, 60)))
    tokenizer = train_sentencepiece(str(docs), tmp_path / "sp.model", vocab_size=400, held_out=20)
    out = run_cli(
        [
            "experiment=cpu_bench",
            "data=c4_sample",
            f"data.path={docs}",
            f"data.tokenizer={tokenizer}",
            "data.val_docs=20",
            "model.vocab_size=400",
            "optimizer=galore",
            "trainer.max_steps=2",
            "eval.tokens=2000",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "model llama_tiny" in out.stdout
    assert "28 matrices (0.80M params) projected: svd basis at rank 32 (std), refresh every 50" in (
        out.stdout
    )


@pytest.mark.parametrize(
    "order, names",
    [
        (1, ["dbpedia", "amazon", "yelp", "agnews"]),  # yahoo -> yelp (its data is missing)
        (2, ["dbpedia", "amazon", "agnews", "yelp"]),
        (3, ["yelp", "amazon", "agnews", "dbpedia"]),
    ],
)
def test_the_continual_learning_orders_are_the_benchmarks(order, names):
    cfg = compose_cfg([f"experiment=cl_order{order}"])
    t = cfg.data.tasks
    assert (cfg.data.source, list(t.names), t.order, t.train_per_class) == (
        "tasks",
        names,
        "sequential",
        1000,
    )
    assert (cfg.trainer.max_steps, cfg.trainer.global_batch_size, cfg.trainer.scheduler) == (
        None,
        64,
        "constant",
    )


def test_cl_bench_gives_every_method_the_same_tasks_schedule_and_budget():
    """make cl-bench: order 1 (yelp for yahoo) from one pretrained llama_20m, one lr per method."""
    import re

    methods = re.search(r"CL_METHODS \?= (\S+)", (REPO / "Makefile").read_text()).group(1)
    common = None
    for name in methods.split(","):
        cfg = OmegaConf.to_container(
            compose_cfg(["experiment=cl_bench", f"optimizer={name}"]), resolve=True
        )
        same = {k: cfg[k] for k in ("model", "data", "trainer", "eval")}
        common = common or same
        assert same == common, name
        assert (REPO / "conf" / "experiment_optimizer" / "cl_bench" / f"{name}.yaml").is_file()
    t = common["data"]["tasks"]
    assert t["names"] == ["dbpedia", "amazon", "yelp", "agnews"] and t["order"] == "sequential"
    assert common["model"]["name"] == "llama_20m" and common["trainer"]["max_steps"] is None
