import torch

from training.ranking import encoder


def test_bf16_autocast_only_where_the_cpu_has_bf16(monkeypatch):
    """Emulated bf16 made encoding ~6x slower on an AVX2-only CPU: there it must run fp32."""
    for native in (False, True):
        monkeypatch.setattr(encoder, "native_bf16", lambda native=native: native)
        with encoder.cpu_autocast():
            assert torch.is_autocast_enabled("cpu") is native
            out = torch.nn.functional.linear(torch.ones(2, 4), torch.ones(3, 4))
        assert out.dtype == (torch.bfloat16 if native else torch.float32)
