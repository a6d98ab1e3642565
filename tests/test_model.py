import pytest
import timm
import torch

from amoe_sdk.config import EncoderConfig, GlobalExpertConfig
from amoe_sdk.errors import WeightsError
from amoe_sdk.models.components import ComponentAssigner
from amoe_sdk.models.detector import AnomalyMoE
from amoe_sdk.models.encoders import build_encoder
from amoe_sdk.models.experts import GlobalExpert, PatchExpert
from amoe_sdk.models.lite0_weights import load_lite0_state_dict
from amoe_sdk.models.router import TopKRouter
from amoe_sdk.training.losses import ClubEstimator, expert_selection_balancing, routed_reconstruction

from conftest import tiny_config


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return AnomalyMoE(tiny_config(random_encoder=True).model).eval()


def test_embedded_lite0_loads_strictly_and_static_padding_is_exact():
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    reference.load_state_dict(load_lite0_state_dict(), strict=True)  # strict: every key mapped
    reference.eval()
    encoder = build_encoder(EncoderConfig(taps=[6]), 128)
    images = torch.rand(2, 3, 128, 128) * 255
    with torch.no_grad():
        normalised = encoder.preprocess(images)
        assert torch.allclose(normalised, (images.flip(1) / 255.0 - 0.5) / 0.5, atol=1e-6)  # BGR -> RGB, TF-Lite's scaling
        expected = reference.blocks(reference.bn1(reference.conv_stem(normalised))).mean(dim=(2, 3))
        got = encoder(images).descriptor
    # timm's dynamic "same" padding replaced by a constant pad: bit-identical at the fixed input size.
    assert torch.equal(got, expected)


def test_dinov2_without_weights_file_is_an_error(tmp_path):
    with pytest.raises(WeightsError, match="local weights file"):
        build_encoder(EncoderConfig(name="dinov2_vits14_reg", taps=[2, 3]), 56)
    with pytest.raises(WeightsError, match="does not exist"):
        build_encoder(EncoderConfig(name="dinov2_vits14_reg", taps=[2, 3], weights=str(tmp_path / "x.pth")), 56)
    bad = tmp_path / "bad.pth"
    torch.save({"something": torch.zeros(1)}, bad)
    with pytest.raises(WeightsError, match="does not match"):
        build_encoder(EncoderConfig(name="dinov2_vits14_reg", taps=[2, 3], weights=str(bad)), 56)


def test_forward_shapes_of_every_level(tiny_model):
    images = torch.rand(3, 3, 128, 128) * 255
    features = tiny_model.encode(images)
    channels = sum(tiny_model.encoder.tap_channels)
    assert features.taps.shape == (3, channels, 8, 8)
    logits, weights, outputs = tiny_model.run_experts(features, images, with_loss=True)
    assert [o.anomaly_map.shape for o in outputs] == [(3, 1, 8, 8)] * tiny_model.num_experts
    assert all(o.loss.shape == (3,) for o in outputs)
    assert tiny_model.expert_levels == ["patch"] * 2 + ["component"] * 2 + ["global"] * 2
    out = tiny_model(images)
    assert out.anomaly_map.shape == (3, 1, 128, 128) and out.score.shape == (3,)
    assert torch.isfinite(out.anomaly_map).all()


def test_router_selects_k_and_weights_sum_to_one():
    router = TopKRouter(10, 16, num_experts=6, top_k=3)
    _, weights = router(torch.randn(5, 10))
    assert ((weights > 0).sum(dim=1) == 3).all()
    assert torch.allclose(weights.sum(dim=1), torch.ones(5))


def test_balance_loss_penalises_collapse():
    uniform_logits = torch.zeros(8, 6) + 0.01 * torch.randn(8, 6)
    collapsed_logits = torch.tensor([[9.0, 8.0, 7.0, 0.0, 0.0, 0.0]]).repeat(8, 1)

    def esb(logits):
        values, indices = logits.topk(3, dim=1)
        weights = torch.zeros_like(logits).scatter(1, indices, values.softmax(1))
        return expert_selection_balancing(logits, weights, 1.0, 0.1)[0]

    assert esb(collapsed_logits) > esb(uniform_logits) + 1.0


def test_router_learns_from_relative_not_raw_losses():
    # Expert 0 (patch, scale 1) beats its level mate; expert 2 (component, scale 0.1) loses to its mate but has the
    # smallest raw loss. The router must be pushed towards expert 0, not towards the numerically cheap level.
    losses = torch.tensor([[0.5, 1.0, 0.2, 0.1]])
    level_of_expert = torch.tensor([0, 0, 1, 1])
    scales = torch.tensor([1.0, 1.0, 0.1, 0.1])
    logits = torch.zeros(1, 4, requires_grad=True)
    weights = torch.zeros(1, 4).scatter(1, torch.tensor([[0, 2]]), logits[:, [0, 2]].softmax(dim=1))
    experts_term, router_term = routed_reconstruction(losses, weights, scales, level_of_expert)
    (gradient,) = torch.autograd.grad(router_term, logits)
    assert gradient[0, 0] < 0 < gradient[0, 2]  # descending raises expert 0's logit and lowers expert 2's
    assert torch.isclose(experts_term, torch.tensor(0.5 * 0.5 + 0.5 * 0.2 * 0.1))


def test_club_bound_is_higher_for_dependent_representations():
    torch.manual_seed(0)
    estimator = ClubEstimator(4, 32)
    optimiser = torch.optim.Adam(estimator.parameters(), lr=1e-2)
    x = torch.randn(256, 4)
    y_dependent = x + 0.1 * torch.randn(256, 4)
    for _ in range(300):
        optimiser.zero_grad()
        (-estimator.log_likelihood(x, y_dependent)).backward()
        optimiser.step()
    with torch.no_grad():
        dependent = estimator.upper_bound(x, y_dependent)
        independent = estimator.upper_bound(x, torch.randn(256, 4))
    assert dependent > 5.0 and dependent > independent + 5.0


def test_hard_mining_scales_gradients_of_easy_positions():
    torch.manual_seed(0)
    config = tiny_config().model.patch
    expert = PatchExpert(config, [6, 10], grid_size=4).eval()
    tokens = torch.randn(2, 16, 16)
    plain = expert(tokens, easy_fraction=0.0).loss.sum()  # no position counts as easy
    mined = expert(tokens, easy_fraction=0.9, easy_scale=0.1).loss.sum()
    assert torch.allclose(plain, mined)  # same value ...
    g_plain = torch.autograd.grad(plain, expert.head.weight)[0]
    g_mined = torch.autograd.grad(mined, expert.head.weight)[0]
    assert g_mined.norm() < 0.6 * g_plain.norm()  # ... smaller gradient


def test_empty_component_slot_gives_no_nan():
    assigner = ComponentAssigner(num_slots=3, channels=4, grid_size=2)
    assigner.prototypes.copy_(torch.tensor([[0.0] * 4, [100.0] * 4, [-100.0] * 4]))
    slots = assigner(torch.zeros(1, 4, 4))
    assert torch.isfinite(slots.features).all() and torch.isfinite(slots.centroids).all()
    assert slots.areas.tolist() == [[1.0, 0.0, 0.0]] and slots.masks.sum() == 4


def test_component_centroids_follow_the_component():
    assigner = ComponentAssigner(num_slots=2, channels=1, grid_size=4)
    assigner.prototypes.copy_(torch.tensor([[0.0], [10.0]]))
    tokens = torch.zeros(1, 16, 1)
    tokens[0, [0, 1, 4, 5]] = 10.0  # slot 1 holds the top-left 2x2 block
    slots = assigner(tokens)
    x, y = slots.centroids[0, 1].tolist()
    assert x < -0.3 and y < -0.3  # grid coordinates run from -1 (left / top) to 1
    assert slots.areas[0, 1] == 0.25


def test_components_are_assigned_on_the_finer_grid_and_pooled_to_the_cells():
    assigner = ComponentAssigner(num_slots=2, channels=1, grid_size=2, component_channels=1, component_grid=4)
    assigner.prototypes.copy_(torch.tensor([[0.0], [10.0]]))
    components = torch.zeros(1, 1, 4, 4)
    components[0, 0, 0, 0] = 10.0  # one fine position: a quarter of the top-left cell
    tokens = torch.tensor([[[4.0], [1.0], [2.0], [3.0]]])  # one value per cell
    slots = assigner(tokens, components)
    assert slots.areas[0].tolist() == [15 / 16, 1 / 16]
    assert slots.masks[0, 1].tolist() == [[0.25, 0.0], [0.0, 0.0]]
    assert slots.features[0, 1].item() == 4.0  # the token of the cell it lies in
    assert torch.isclose(slots.features[0, 0, 0], torch.tensor((0.75 * 4 + 1 + 2 + 3) / 3.75))
    assert slots.composition.tolist() == [[0.0, 0.0]]  # no composition term until fitted


@pytest.mark.parametrize("activation, map_varies", [("relu", False), ("leaky_relu", True)])
def test_a_leaky_global_expert_keeps_its_map_alive_where_relu_dies(activation, map_varies):
    torch.manual_seed(0)
    expert = GlobalExpert(GlobalExpertConfig(width=16, code_dim=8, activation=activation), channels=4, grid_size=8)
    with torch.no_grad():  # every hidden unit pushed below zero: what distillation did to the ReLU student's
        for layer in list(expert.student) + list(expert.ae_encoder):
            if isinstance(layer, torch.nn.Conv2d) and layer.out_channels != 4:
                layer.bias.fill_(-100.0)
    images = torch.rand(2, 3, 64, 64) * 255
    maps = expert(images).anomaly_map
    assert torch.allclose(maps[0], maps[1]) is not map_varies
    assert GlobalExpertConfig().activation == "relu"  # a checkpoint from before the option keeps its behaviour


def test_fusion_keeps_a_level_that_the_top_k_left_out(tiny_model):
    e = tiny_model.num_experts
    g = tiny_model.grid_size
    maps = torch.zeros(1, e, g, g)
    global_experts = [i for i, level in enumerate(tiny_model.expert_levels) if level == "global"]
    maps[0, global_experts, 0, 0] = 100.0  # only the global level sees the defect
    logits = torch.zeros(1, e)
    weights = torch.zeros(1, e)
    weights[0, 0] = 1.0  # the router picked one patch expert and no global one
    fused = tiny_model.fuse(maps, logits, weights)
    assert fused[0, 0, 0, 0] > fused[0, 0, 1, 1] + 1.0


def test_inference_has_no_data_dependent_control_flow(tiny_model):
    class MapOnly(torch.nn.Module):
        def __init__(self, detector):
            super().__init__()
            self.detector = detector

        def forward(self, x):
            return self.detector(x).anomaly_map

    # A trace records one path through the code: it reproduces other inputs only if no branch depends on data.
    images = torch.rand(2, 3, 128, 128) * 255
    with torch.no_grad():
        traced = torch.jit.trace(MapOnly(tiny_model), images, check_trace=False)
        other = torch.rand(2, 3, 128, 128) * 255
        assert torch.allclose(traced(other), tiny_model(other).anomaly_map, atol=1e-5)
