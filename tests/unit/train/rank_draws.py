"""A process of test_speech_towers' two-rank LayerDrop test: kept apart so each spawned rank imports little."""
import torch
import torch.distributed as dist

from clap_core.model.encoders.speech import layer_drop_mask


def draw_on_rank(rank: int, store_path: str, out_path: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    torch.manual_seed(rank)  # ranks' RNGs differ, as in pretraining (seed + 1000 * rank)
    draws = [layer_drop_mask(12, 0.5, torch.device("cpu")) for _ in range(5)]
    dist.destroy_process_group()
    torch.save(draws, f"{out_path}.{rank}")
