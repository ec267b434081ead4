"""LAION-CLAP held loaded in its own environment, timing one call or one train step per request.

Run by `bench_peers.py --interleave` with the peers' interpreter (../shared/peers), never imported by this
project: it imports only the peers' harness (peer_bench.py), whose cases it repeats one call at a time, so
that LAION-CLAP's calls and ours alternate on the same machine minute by minute instead of one whole case after
the other. Protocol, one JSON object a line: a request on stdin, {"case": "filelist"} (one
`get_audio_embedding_from_filelist` of the harness' 32 wav files) or {"case": "train"} (one step of the
harness' `laion_train` case: batch 8 of 10 s, text length --text-len, LAION's ClipLoss, backward, AdamW); the
answer on stdout as `TIMED {"case": ..., "s": seconds}` (LAION-CLAP prints lines of its own there).
"""
import argparse
import json
import sys
import time


def filelist_call(pb, args):
    """() -> seconds of one filelist call, the module built once (peer_bench.case_laion_filelist's call)."""
    files = pb._make_wavs(args.workdir)
    module, _, _ = pb._laion_module()

    def call():
        start = time.perf_counter()
        out = module.get_audio_embedding_from_filelist(files)
        assert out.shape == (pb.N_CLIPS, 512), out.shape
        return time.perf_counter() - start
    return call


def train_step(pb, args):
    """() -> seconds of one train step (peer_bench.case_laion_train's step and optimizer), model built once."""
    import torch
    from laion_clap.clap_module import ClipLoss

    module, _, _ = pb._laion_module()
    model = module.model.train()
    wave = torch.from_numpy(pb._batch_audio(pb.TRAIN_BS, seed=2))
    audio = {"waveform": wave, "longer": torch.zeros(pb.TRAIN_BS, dtype=torch.bool)}
    ids, mask = pb._rand_ids(torch, pb.TRAIN_BS, args.text_len)
    text = {"input_ids": ids, "attention_mask": mask}
    loss_fn = ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=True, rank=0, world_size=1,
                       use_horovod=False, mlp_loss=False, weight_loss_kappa=0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    device = torch.device("cpu")

    def step():
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        audio_f, text_f, _, _, scale_a, _ = model(audio, text, device)
        loss_fn(audio_features=audio_f, text_features=text_f, logit_scale_a=scale_a).backward()
        opt.step()
        return time.perf_counter() - start
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--peers-dir", required=True, help="the folder of peer_bench.py")
    parser.add_argument("--workdir", required=True, help="where the harness writes its wav files")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--text-len", type=int, default=32)
    args = parser.parse_args()
    sys.path.insert(0, args.peers_dir)
    import peer_bench as pb

    pb._setup_torch(args)
    makers = {"filelist": filelist_call, "train": train_step}
    timers = {}
    for line in sys.stdin:
        case = json.loads(line)["case"]
        if case not in timers:
            timers[case] = makers[case](pb, args)
        print("TIMED " + json.dumps({"case": case, "s": timers[case]()}), flush=True)


if __name__ == "__main__":
    main()
