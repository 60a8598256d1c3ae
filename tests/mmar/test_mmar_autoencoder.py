"""KL autoencoder: LDM parameter names, weight loading, shapes and the posterior."""

from __future__ import annotations

import pytest
import torch

from mmtk.core.errors import InputError
from mmtk.nn.autoencoder import (
    DiagonalGaussian,
    KLAutoencoder,
    autoencoder_checkpoint_state,
    autoencoder_from_checkpoint_state,
    ldm_kl16_config,
    load_autoencoder_weights,
    small_kl_config,
)


@pytest.fixture(scope="module")
def kl16():
    torch.manual_seed(0)
    return KLAutoencoder(ldm_kl16_config(), scale_factor=0.2325).eval()


def test_kl16_has_ldm_parameter_names(kl16):
    shapes = {k: tuple(v.shape) for k, v in kl16.state_dict().items()}
    # Names and shapes of the LDM KL-16 checkpoint layout (ch 128, ch_mult 1,1,2,2,4, attention at 16 px).
    expected = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.2.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.3.downsample.conv.weight": (256, 256, 3, 3),
        "encoder.down.4.attn.1.proj_out.weight": (512, 512, 1, 1),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.conv_out.weight": (32, 512, 3, 3),
        "quant_conv.weight": (32, 32, 1, 1),
        "post_quant_conv.weight": (16, 16, 1, 1),
        "decoder.conv_in.weight": (512, 16, 3, 3),
        "decoder.up.4.attn.2.k.weight": (512, 512, 1, 1),
        "decoder.up.4.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.up.3.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for name, shape in expected.items():
        assert shapes.get(name) == shape, name
    assert "encoder.down.4.downsample.conv.weight" not in shapes
    assert "decoder.up.0.upsample.conv.weight" not in shapes
    assert not any(".attn." in k for k in shapes if k.startswith(("encoder.down.3", "decoder.up.3")))


def test_kl16_downsamples_by_16(kl16):
    with torch.no_grad():
        posterior = kl16.encode(torch.zeros(1, 3, 32, 32))
        assert posterior.mean.shape == (1, 16, 2, 2)
        assert kl16.decode(posterior.mean).shape == (1, 3, 32, 32)


def test_encode_rejects_indivisible_size():
    model = KLAutoencoder(small_kl_config())
    with pytest.raises(ValueError, match="multiple of the downsampling factor 8"):
        model.encode(torch.zeros(1, 3, 60, 64))


def test_load_mar_style_checkpoint(tmp_path, kl16):
    path = tmp_path / "kl16.ckpt"
    torch.save({"model": kl16.state_dict()}, path)
    fresh = KLAutoencoder(ldm_kl16_config())
    load_autoencoder_weights(fresh, path)
    for name, tensor in kl16.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name


def test_load_ldm_checkpoint_drops_loss_tensors(tmp_path):
    model = KLAutoencoder(small_kl_config())
    state = {f"{k}": v for k, v in model.state_dict().items()}
    state["loss.discriminator.main.0.weight"] = torch.zeros(3)
    path = tmp_path / "ldm.ckpt"
    torch.save({"state_dict": state}, path)
    fresh = KLAutoencoder(small_kl_config())
    load_autoencoder_weights(fresh, path)
    assert torch.equal(fresh.encoder.conv_in.weight, model.encoder.conv_in.weight)


def test_load_safetensors(tmp_path):
    from safetensors.torch import save_file

    model = KLAutoencoder(small_kl_config())
    path = tmp_path / "ae.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    fresh = load_autoencoder_weights(KLAutoencoder(small_kl_config()), path)
    assert torch.equal(fresh.decoder.conv_out.weight, model.decoder.conv_out.weight)


def test_load_mismatched_weights_names_the_problem(tmp_path):
    path = tmp_path / "small.pt"
    torch.save(KLAutoencoder(small_kl_config()).state_dict(), path)
    with pytest.raises(InputError, match="do not match the configured architecture"):
        load_autoencoder_weights(KLAutoencoder(ldm_kl16_config()), path)
    with pytest.raises(InputError, match="not found"):
        load_autoencoder_weights(KLAutoencoder(small_kl_config()), tmp_path / "absent.pt")


def test_checkpoint_state_round_trip():
    model = KLAutoencoder(small_kl_config(), scale_factor=1.7)
    rebuilt = autoencoder_from_checkpoint_state(autoencoder_checkpoint_state(model))
    assert rebuilt.scale_factor == 1.7
    assert rebuilt.config == model.config
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(rebuilt.encode(images).mean, model.encode(images).mean)


def test_posterior_kl_by_hand():
    mean = torch.tensor([[[[1.0]], [[0.0]]]])
    logvar = torch.tensor([[[[0.0]], [[float(torch.log(torch.tensor(4.0)))]]]])
    posterior = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    # KL(N(1,1) || N(0,1)) = 0.5 and KL(N(0,4) || N(0,1)) = 0.5 (4 - 1 - ln 4).
    expected = 0.5 + 0.5 * (4 - 1 - float(torch.log(torch.tensor(4.0))))
    assert posterior.kl().item() == pytest.approx(expected, rel=1e-6)
