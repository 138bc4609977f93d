import pytest
import torch

from okdpipe.distill.students import Students


@pytest.fixture(params=["peers", "branches"])
def students(request):
    torch.manual_seed(0)
    return Students("resnet8", 3, num_classes=5, in_channels=1, layout=request.param).eval()


def test_extracted_student_is_a_plain_network_with_the_same_outputs(students):
    x = torch.randn(1, 4, 1, 28, 28)
    out = students(x)
    assert out.logits.shape == (3, 4, 5)
    for i in range(3):
        plain = students.extract(i).eval()
        assert type(plain).__name__ != "Students"
        torch.testing.assert_close(plain(x[0]), out.logits[i], rtol=0, atol=0)


def test_student_i_sees_view_i(students):
    views = torch.randn(3, 2, 1, 28, 28)
    out = students(views)
    for i in range(3):
        torch.testing.assert_close(students.extract(i).eval()(views[i]), out.logits[i], rtol=0, atol=0)


def test_branches_share_one_trunk_and_peers_share_nothing():
    torch.manual_seed(0)
    branches = Students("resnet8", 3, 5, 1, layout="branches")
    peers = Students("resnet8", 3, 5, 1, layout="peers")
    one = sum(p.numel() for p in Students("resnet8", 1, 5, 1, layout="peers").parameters())
    assert sum(p.numel() for p in peers.parameters()) == 3 * one
    assert sum(p.numel() for p in branches.parameters()) < 3 * one
    loss = branches(torch.randn(1, 2, 1, 28, 28)).logits[0].sum()
    loss.backward()
    assert branches.trunk["stem"][0].weight.grad is not None
    assert all(p.grad is None or not p.grad.any() for p in branches.branches[1].parameters())


def test_same_init_gives_identical_students():
    torch.manual_seed(0)
    s = Students("resnet8", 2, 5, 1, same_init=True)
    for a, b in zip(s.members[0].parameters(), s.members[1].parameters()):
        assert torch.equal(a, b)


def test_too_few_views_is_an_error(students):
    with pytest.raises(ValueError, match="views"):
        students(torch.randn(2, 2, 1, 28, 28))
