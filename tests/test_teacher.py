"""EMA teacher against the closed form θ_t(n) = α^n θ_0 + (1−α) Σ_{j=1..n} α^{n−j} θ_s(j)."""
import torch
from torch import nn

from degla_scale.teacher import EMATeacher


def test_ema_matches_closed_form():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4))
    alpha, n = 0.9, 7
    theta0 = [p.detach().clone().double() for p in student.parameters()]
    teacher = EMATeacher(student, alpha)
    history = []
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    for _ in range(n):
        loss = student(torch.randn(3, 5)).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        teacher.update(student)
        history.append([p.detach().clone().double() for p in student.parameters()])
    for i, t in enumerate(teacher.module.parameters()):
        expected = alpha ** n * theta0[i] + sum((1 - alpha) * alpha ** (n - j) * history[j - 1][i] for j in range(1, n + 1))
        assert t.dtype == torch.float32
        torch.testing.assert_close(t.double(), expected, rtol=1e-6, atol=1e-6)
    assert teacher.updates == n


def test_teacher_starts_as_copy_and_is_frozen():
    student = nn.Linear(3, 2).to(torch.bfloat16)
    teacher = EMATeacher(student, 0.99)
    for s, t in zip(student.parameters(), teacher.module.parameters()):
        assert t.dtype == torch.float32 and not t.requires_grad
        torch.testing.assert_close(t, s.float())
