"""The held-out ablation's pieces: % of the model oracle's gain, oracle UNets by layer kind, routing accuracy."""
import numpy as np
import torch

from segmoe_lab import toy
from segmoe_lab.toy import ablation


def test_percent_of_gain_is_100_for_the_oracle_and_0_for_the_base():
    base, oracle = np.array([0.2, 0.4, 0.5]), np.array([0.6, 0.8, 0.5])
    assert ablation.pct_of_gain(oracle, base, oracle)[0] == 100
    assert ablation.pct_of_gain(base, base, oracle)[0] == 0
    assert abs(ablation.pct_of_gain((base + oracle) / 2, base, oracle)[0] - 50) < 1e-9


def test_the_oracle_unet_of_every_kind_is_the_expert():
    base, expert = toy.load_pipeline("base").unet, toy.load_pipeline("neon").unet
    unet = ablation.oracle_unet(base, expert, ["all"])
    for (name, a), b in zip(unet.state_dict().items(), expert.state_dict().values()):
        assert torch.equal(a, b), name


def test_the_oracle_unet_keeps_the_base_outside_its_kinds():
    base, expert = toy.load_pipeline("base").unet, toy.load_pipeline("neon").unet
    unet = ablation.oracle_unet(base, expert, ["resnet"])
    assert torch.equal(unet.conv_in.weight, base.conv_in.weight)
    assert torch.equal(unet.down_blocks[0].resnets[0].conv1.weight, expert.down_blocks[0].resnets[0].conv1.weight)


def test_routing_accuracy_is_per_kind_with_its_worst_site():
    labels = np.array([0, 1, 2, 0])
    choices = {("a", "ff"): np.array([0, 1, 2, 0]), ("b", "ff"): np.array([0, 1, 1, 1])}
    assert ablation.routing_accuracy(choices, labels) == {"ff": (0.75, 0.5)}


def test_the_cli_offers_the_ablation():
    from typer.testing import CliRunner

    from segmoe_lab.cli import app

    result = CliRunner().invoke(app, ["toy", "ablation", "--help"])
    assert result.exit_code == 0 and "held-out" in result.output
