"""Pretraining building blocks in plain PyTorch + DeepSpeed (no Ray): `pipelines/pretrain.py` wires them into
Ray Train.

    config.py      PretrainConfig: the `clap pretrain` YAML (train, deepspeed, scaling, data, model sections)
    batching.py    shard rows -> model-ready batches (decode, crop, tokenize), run in Ray Data tasks
    loss.py        InfoNCE and SigLIP, gathered across workers; build_loss picks the model's
    optim.py       AdamW parameter groups, warmup + cosine schedule
    gradcache.py   one contrastive step, plain or with a gradient cache
    engine.py      the DeepSpeed engine: config, train_step, checkpoint folder (train_state.json), weights
    safe_load.py   loading DeepSpeed checkpoints without unpickling code
    validation.py  the validation split, embedded rank-sharded, and the retrieval metrics
    run_log.py     console lines, TensorBoard, metric history, metrics.json and curves.png
    worker.py      WorkerContext and the steps of a worker's loop: logging, bad-row bound, fault hook, export
"""
