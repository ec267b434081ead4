"""Worker pools that autoscale: preprocessing and embedding ask for a range of actors (more than the
cluster has now), and `clap embed --gpus` asks for GPU actors before a GPU node exists."""
from __future__ import annotations

import os

import pytest

from clap_core.config import ConfigError
from clap_core.preprocess.config import load_preprocess_config
from pipelines.embed import EmbedBatch, actor_pool, actor_threads
from pipelines.preprocess import pool_strategy


def sizes(strategy) -> tuple[int, int]:
    return strategy.min_size, strategy.max_size


def test_preprocess_pool_is_a_range_up_to_one_actor_per_unit():
    assert sizes(pool_strategy(load_preprocess_config(), 18)) == (1, 18)  # not sized from today's cluster
    assert sizes(pool_strategy(load_preprocess_config(None, ["ray.min_workers=4", "ray.max_workers=256"]), 18)) == (4, 18)
    assert sizes(pool_strategy(load_preprocess_config(None, ["ray.min_workers=2", "ray.max_workers=3"]), 18)) == (2, 3)
    assert sizes(pool_strategy(load_preprocess_config(None, ["ray.concurrency=2"]), 18)) == (2, 2)
    assert sizes(pool_strategy(load_preprocess_config(None, ["ray.min_workers=4"]), 2)) == (2, 2)  # few units
    with pytest.raises(ConfigError, match="max_workers"):
        load_preprocess_config(None, ["ray.min_workers=4", "ray.max_workers=2"])


def test_embed_pool_gpu_setting():
    assert actor_pool(0, None, None, 1, None) == (0.0, (1, 2))  # no GPU anywhere: CPU actors, as before
    assert actor_pool(4, None, None, 1, None) == (1.0, (1, 4))  # GPUs present: one actor per GPU
    assert actor_pool(0, 1.0, None, 1, 8) == (1.0, (1, 8))  # --gpus 1 before any GPU node: GPU actors anyway
    assert actor_pool(0, 0.5, 3, 1, None) == (0.5, 3)  # fixed --concurrency
    assert actor_pool(0, 0, None, 2, 2) == (0, 2)  # min == max: a fixed size


def test_cpu_embedding_actors_share_the_cluster_cpus_between_their_torch_threads():
    assert actor_threads(2, 0.0, 1) == 2  # a laptop: one actor, both cores (Ray's reservation alone gives it 1)
    assert actor_threads(8, 0.0, (1, 2)) == 4  # up to 2 actors: 4 threads each
    assert actor_threads(3, 0.0, 2) == 1
    assert actor_threads(16, 1.0, (1, 4)) is None  # GPU actors: Ray's default
    assert actor_threads(0, 0.0, 2) is None  # no CPU figure: Ray's default


def test_embed_actor_runs_its_torch_threads_on_the_batches_thread(tmp_path):
    """Ray calls an actor's constructor and its batches on two different threads, and OpenMP gives each thread
    that opens a parallel region a team of its own: the model loads on one thread (no team on the
    constructor's), and each batch sets the actor's thread count on the thread it runs on."""
    import threading

    import numpy as np
    import torch

    from clap_core.model.clap import ClapModel
    from clap_core.model.config import get_model_config

    ClapModel(get_model_config("tiny")).save_pretrained(tmp_path / "ckpt")
    wave = np.array([np.zeros(24_000, np.float32), None], dtype=object)[:1]  # one 0.5 s clip, a column of arrays

    def batch_on_a_thread_of_its_own(actor: EmbedBatch) -> tuple[int, tuple]:
        seen = {}

        def run():
            out = actor({"id": np.array(["a"]), "wave": wave.copy()})
            seen.update(threads=torch.get_num_threads(), shape=out["audio_embedding"].shape)

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        return seen["threads"], seen["shape"]

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        actor = EmbedBatch(str(tmp_path / "ckpt"), 4, text=False, threads=2)
        assert torch.get_num_threads() == 1  # the constructor's thread loaded the model on one thread
        assert not actor.model.has_text_tower  # no captions to embed: the text tower is never read
        assert batch_on_a_thread_of_its_own(actor) == (min(2, os.cpu_count()), (1, actor.model.config.embed_dim))
        actor = EmbedBatch(str(tmp_path / "ckpt"), 4, text=False, threads=10_000)  # at most the node's cores
        assert batch_on_a_thread_of_its_own(actor)[0] == os.cpu_count()
        torch.set_num_threads(3)
        EmbedBatch(str(tmp_path / "ckpt"), 4, text=False, threads=None)  # a GPU actor: Ray's setting stands
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
