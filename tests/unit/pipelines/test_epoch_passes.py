"""How many times one Ray Data epoch of `clap pretrain` reads the training split (pipelines.pretrain.epoch_passes):
by default enough for the whole run, so a small corpus never stalls at an epoch boundary mid-run."""
from clap_core.train.config import load_pretrain_config
from pipelines.job_configs import default_config_path
from pipelines.pretrain import MAX_PASSES, epoch_passes


def cfg(*overrides: str):
    return load_pretrain_config(default_config_path("pretrain"), list(overrides))


def test_the_shipped_default_covers_the_whole_run():
    shipped = cfg("train.steps=300", "train.batch_size=32", "scaling.num_workers=2")
    assert shipped.data.min_epoch_rows is None
    # the demo, a 658-row split: 300 x 32 x 2 = 19,200 rows trained on, and what each of the 2 workers' feeds
    # reads ahead of its last step: 658 buffered (two passes of its 329-row share) + (4 prefetched + 3) x 32 =
    # 882 rows; 20,964 in all
    assert epoch_passes(shipped, 658) == 32
    assert epoch_passes(shipped, 19_200) == 2  # the trained rows alone would end the epoch before the run
    assert epoch_passes(shipped, 21_696) == 1  # 1024 buffered + 224 per worker: 21,696 rows
    assert epoch_passes(cfg("train.steps=300", "train.batch_size=32", "scaling.num_workers=2",
                            "data.shuffle_buffer=0"), 19_200 + 2 * 7 * 32) == 1
    assert epoch_passes(shipped, 8_000_000) == 1  # a production corpus: one pass, boundaries once per pass


def test_an_explicit_floor_and_the_cap():
    assert epoch_passes(cfg("data.min_epoch_rows=384"), 48) == 8
    assert epoch_passes(cfg("data.min_epoch_rows=0"), 48) == 1  # one pass per epoch
    assert epoch_passes(cfg("data.min_epoch_rows=10"), 0) == 10  # no rows counted: never a division by zero
    huge = cfg("train.steps=1000000", "train.batch_size=256", "scaling.num_workers=8")
    assert epoch_passes(huge, 100) == MAX_PASSES  # a tiny corpus and a long run: a bounded read plan
