import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from trainers.metrics import all_reduce_sum, confusion_matrix, scores_from_confusion


def test_hand_computed_example():
    # true:  0 0 1 1 2 ; predicted: 0 1 1 1 0
    cm = confusion_matrix(torch.tensor([0, 0, 1, 1, 2]), torch.tensor([0, 1, 1, 1, 0]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    s = scores_from_confusion(cm)
    assert s["accuracy"] == pytest.approx(3 / 5)
    # precision per class: 1/2, 2/3, 0 (never predicted); recall: 1/2, 1, 0
    assert s["precision"] == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)
    assert s["recall"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    f1 = [2 * 0.5 * 0.5 / 1.0, 2 * (2 / 3) * 1 / (2 / 3 + 1), 0]
    assert s["f1"] == pytest.approx(sum(f1) / 3)


def test_matches_scikit_learn_on_random_labels():
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 6, (500,), generator=gen)
    p = torch.where(torch.rand(500, generator=gen) < 0.6, y, torch.randint(0, 6, (500,), generator=gen))
    s = scores_from_confusion(confusion_matrix(y, p, 6))
    prec, rec, f1, _ = precision_recall_fscore_support(y, p, average="macro", zero_division=0)
    assert s["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert (s["precision"], s["recall"], s["f1"]) == pytest.approx((prec, rec, f1))


def test_macro_scores_skip_classes_absent_from_labels_and_predictions_as_scikit_learn():
    """A folder holding 2 of 10 classes, every image right: macro recall is 1, not 0.2."""
    y = torch.tensor([3, 3, 7, 7, 7])
    s = scores_from_confusion(confusion_matrix(y, y, 10))
    assert (s["precision"], s["recall"], s["f1"]) == (1.0, 1.0, 1.0)
    gen = torch.Generator().manual_seed(1)
    for trial in range(40):  # random confusion matrices, some classes absent from both sides
        k = int(torch.randint(2, 9, (), generator=gen))
        used = torch.randperm(k, generator=gen)[: int(torch.randint(1, k + 1, (), generator=gen))]
        n = int(torch.randint(1, 60, (), generator=gen))
        y = used[torch.randint(0, len(used), (n,), generator=gen)]
        p = torch.where(torch.rand(n, generator=gen) < 0.5, y, torch.randint(0, k, (n,), generator=gen))
        s = scores_from_confusion(confusion_matrix(y, p, k))
        expected = precision_recall_fscore_support(y, p, average="macro", zero_division=0)[:3]
        assert (s["precision"], s["recall"], s["f1"]) == pytest.approx(expected), (trial, y.tolist(), p.tolist())
    empty = scores_from_confusion(torch.zeros(4, 4, dtype=torch.long))
    assert empty == {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0}


def _rank_main(rank, world, port, y, p, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cm = confusion_matrix(y[rank::world], p[rank::world], 4)  # each rank sees only its shard
    all_reduce_sum(cm)
    out[rank] = torch.tensor(list(scores_from_confusion(cm).values()))
    dist.destroy_process_group()


def test_all_reduced_confusion_over_two_ranks_equals_whole_set():
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 3, 3, 1])
    p = torch.tensor([0, 1, 1, 3, 0, 2, 2, 3, 0, 3, 1])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = torch.zeros(2, 4).share_memory_()
    mp.spawn(_rank_main, args=(2, port, y, p, out), nprocs=2, join=True)
    whole = torch.tensor(list(scores_from_confusion(confusion_matrix(y, p, 4)).values()))
    # Averaging per-rank scores would differ; the reduced confusion matrix must not.
    assert torch.allclose(out[0], whole) and torch.allclose(out[1], whole)
