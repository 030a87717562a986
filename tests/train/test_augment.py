"""The training recipe's parts, without Ray: batched augmentation on the uint8 cache, the
artefact bank, metadata dropout, colour constancy, frozen layers, the moving average and the
measured memory layout."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raysky.data.metadata import EncodedMetadata
from raysky.models import create_classifier, create_segmenter
from raysky.models.config import PRESETS, AugmentConfig, recipe_from_dict, recipe_to_dict
from raysky.models.preprocess import normalize, shades_of_gray
from raysky.train.augment import (
    ArtefactBank,
    Augmenter,
    augment_batch,
    augment_pairs,
    colour_matrices,
    epoch_generator,
    resize_batch,
)
from raysky.train.recipe import (
    MEMORY_LAYOUTS,
    averaged,
    choose_memory_format,
    freeze_early_layers,
    keep_frozen_in_eval,
    make_average,
)
from raysky.train.settings import LoopConfig, TrainSettings
from raysky.train.tasks import ClassifierTask, jensen_shannon

GEOMETRY_ONLY = AugmentConfig(brightness=0, contrast=0, saturation=0, hue=0, transpose=0.5)


def _disks(n: int = 8, size: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    """Dark noisy skin with a red disk lesion at a different place in each image."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    images = rng.integers(0, 80, size=(n, size, size, 3), dtype=np.uint8)
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        cy, cx = rng.integers(25, size - 25, 2)
        masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 < 18**2
        images[i][masks[i] == 1] = (230, 20, 20)
    return torch.from_numpy(images), torch.from_numpy(masks)


def _red(images: torch.Tensor) -> torch.Tensor:
    return (images[:, 0] > 0.6) & (images[:, 1] < 0.35)


def test_geometry_moves_image_and_mask_together():
    images, masks = _disks()
    out, out_mask = augment_batch(images, masks, 64, GEOMETRY_ONLY, epoch_generator(0, 0, 0))
    assert out.shape == (8, 3, 64, 64) and out_mask.shape == (8, 1, 64, 64)
    assert set(out_mask.unique().tolist()) <= {0.0, 1.0}
    red, lesion = _red(out), out_mask[:, 0].bool()
    for i in range(8):
        if lesion[i].sum() > 30:
            # Away from the resampled rim, lesion pixels are red and the skin is not.
            assert red[i][lesion[i]].float().mean() > 0.8
            assert red[i][~lesion[i]].float().mean() < 0.1
    plain, plain_mask = resize_batch(images, masks, 64)
    assert not torch.equal(out_mask, plain_mask), "augmentation never changed the geometry"


def test_colour_jitter_changes_the_image_only_and_validation_resize_is_deterministic():
    images, masks = _disks()
    colour_only = replace(AugmentConfig.none(), brightness=0.4, contrast=0.4, saturation=0.4,
                          hue=0.05)
    plain, plain_mask = augment_batch(images, masks, 64, AugmentConfig.none(),
                                      epoch_generator(0, 0, 0))
    jittered, jittered_mask = augment_batch(images, masks, 64, colour_only, epoch_generator(0, 0, 0))
    assert torch.equal(jittered_mask, plain_mask)
    assert (jittered - plain).abs().mean() > 0.01
    resized, resized_mask = resize_batch(images, masks, 64)
    again, again_mask = resize_batch(images, masks, 64)
    assert torch.equal(again, resized) and torch.equal(again_mask, resized_mask)


def test_the_combined_colour_map_is_the_identity_without_jitter_and_keeps_grey_grey():
    matrix, pull = colour_matrices(4, AugmentConfig.none(), torch.Generator().manual_seed(0))
    assert torch.allclose(matrix, torch.eye(3).expand(4, 3, 3), atol=1e-5)
    assert torch.allclose(pull, torch.zeros(4))
    hue_only = replace(AugmentConfig.none(), hue=0.2, saturation=0.5)
    matrix, _ = colour_matrices(4, hue_only, torch.Generator().manual_seed(1))
    grey = torch.full((4, 3, 1), 0.4)
    assert torch.allclose(matrix @ grey, grey, atol=1e-5)


def test_the_same_seed_draws_the_same_augmentations_and_epochs_differ():
    images, masks = _disks()
    config = PRESETS["lite"].classifier_recipe.augment
    augmenter = Augmenter(replace(config, artefacts=0.0), 64, 96, seed=7, rank=0)
    augmenter.start_epoch(0)
    first = augmenter(images.numpy(), masks.numpy(), train=True)[0]
    augmenter.start_epoch(0)
    again = augmenter(images.numpy(), masks.numpy(), train=True)[0]
    augmenter.start_epoch(1)
    next_epoch = augmenter(images.numpy(), masks.numpy(), train=True)[0]
    other_rank = Augmenter(replace(config, artefacts=0.0), 64, 96, seed=7, rank=1)
    assert torch.equal(first, again)
    assert not torch.equal(first, next_epoch)
    assert not torch.equal(first, other_rank(images.numpy(), masks.numpy(), train=True)[0])


def test_lesion_zoom_fills_the_frame_with_the_lesion():
    images, masks = _disks()
    zoom = replace(AugmentConfig.none(), lesion_zoom=1.0, zoom_margin=(0.05, 0.05))
    _, zoomed = augment_batch(images, masks, 64, zoom, epoch_generator(0, 0, 0))
    _, plain = resize_batch(images, masks, 64)
    # A 36 px disk in a 96 px image covers about 11%; its tight box leaves it about 70%.
    assert plain.mean() < 0.15
    assert zoomed.mean(dim=(1, 2, 3)).min() > 0.5
    empty = torch.zeros_like(masks)
    _, fallback = augment_batch(images, empty, 64, zoom, epoch_generator(0, 0, 0))
    assert fallback.sum() == 0  # no lesion to zoom on: the whole image, no crash


def test_pasted_artefacts_never_touch_the_lesion_and_reach_the_skin():
    images, masks = _disks()
    bank = ArtefactBank.draw(96, seed=0, per_kind=2)
    assert set(bank.kinds) == {"ruler", "ink", "bubbles", "hair", "vignette"}
    pixels = images.permute(0, 3, 1, 2).float() / 255
    pasted = bank.paste(pixels, masks.bool(), 1.0, torch.Generator().manual_seed(0))
    changed = (pasted - pixels).abs().amax(dim=1) > 1e-6
    assert not changed[masks.bool()].any()
    assert changed.flatten(1).any(dim=1).all(), "every image should have got an artefact"
    none = bank.paste(pixels, masks.bool(), 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(none, pixels)
    with pytest.raises(ValueError, match="ArtefactBank"):
        augment_batch(images, masks, 64, replace(AugmentConfig.none(), artefacts=0.5),
                      epoch_generator(0, 0, 0))


def test_a_clean_twin_differs_from_its_artefacted_image_by_the_artefact_alone():
    images, masks = _disks()
    config = AugmentConfig(transpose=0.5, lesion_zoom=0.5, artefacts=1.0)
    bank = ArtefactBank.draw(96, seed=0, per_kind=2)
    out, out_mask, twin_of = augment_pairs(images, masks, 64, config, epoch_generator(0, 0, 0),
                                           bank, pairs=3)
    assert out.shape == (11, 3, 64, 64) and out_mask.shape == (11, 1, 64, 64)
    assert len(twin_of) == 3 and len(set(twin_of.tolist())) == 3
    # The twins cost no draws: the batch itself is what augment_batch gives for the seed.
    alone, alone_mask = augment_batch(images, masks, 64, config, epoch_generator(0, 0, 0), bank)
    assert torch.equal(out[:8], alone) and torch.equal(out_mask[:8], alone_mask)
    # Same crop, rotation, flips and colour: the lesion is the same to the last bit...
    assert torch.equal(out_mask[8:], out_mask[twin_of])
    inside = -F.max_pool2d(-out_mask[8:], 5, stride=1, padding=2) > 0
    difference = (out[8:] - out[twin_of]).abs().amax(dim=1, keepdim=True)
    assert inside.any() and difference[inside].max() < 1e-5
    # ...and the skin differs where an artefact was pasted (unless the crop left it out).
    assert (difference.flatten(1).amax(dim=1) > 0.05).any()
    # Without a layer to paste, a twin is its image.
    blank = ArtefactBank(bank.colour, torch.zeros_like(bank.alpha), bank.kinds)
    out, _, twin_of = augment_pairs(images, masks, 64, config, epoch_generator(0, 0, 0), blank,
                                    pairs=8)
    assert torch.allclose(out[8:], out[twin_of], atol=1e-6)


def test_the_consistency_loss_adds_the_pairs_divergence_and_labels_only_the_batch():
    augment = replace(AugmentConfig.none(), artefacts=1.0)
    task = _classifier_task(augment=augment, artefact_consistency=10.0)
    model = task.build_model().eval()
    batch = {**task.synthetic_batch(8), "age": np.tile([[0.5, 0.0]], (8, 1)).astype(np.float32),
             "sex": np.arange(8) % 2, "site": np.arange(8)}
    inputs = task.inputs(batch, torch.device("cpu"), train=True)
    twin_of = inputs["twin_of"]
    assert len(twin_of) == 2 and len(inputs["label"]) == 8  # a quarter of 8 get a twin
    assert inputs["image"].shape[0] == inputs["mask"].shape[0] == 10
    # A twin shows its image's patient (as metadata dropout left it).
    for name, values in inputs["metadata"].items():
        assert torch.equal(values[8:], values[twin_of]), name
    logits = model(inputs["image"], inputs["mask"], inputs["metadata"]).float()
    plain = F.cross_entropy(logits[:8], inputs["label"], weight=task.weight, label_smoothing=0.0)
    expected = plain + 10.0 * jensen_shannon(logits[twin_of], logits[8:])
    assert torch.allclose(task.loss(model, inputs), expected, atol=1e-5)
    assert float(jensen_shannon(logits, logits).detach()) == pytest.approx(0.0, abs=1e-6)
    # Validation and runs without the loss see no twins.
    assert len(task.inputs(batch, torch.device("cpu"))["twin_of"]) == 0
    off = _classifier_task(augment=augment)
    assert len(off.inputs(batch, torch.device("cpu"), train=True)["twin_of"]) == 0


def _classifier_task(**recipe) -> ClassifierTask:
    base = recipe_to_dict(replace(PRESETS["tiny"].classifier_recipe, **recipe))
    settings = TrainSettings(data="unused", name="augment", preset="tiny", epochs=1,
                             batch_size=4, lr=1e-3,
                             artefact_consistency=recipe.get("artefact_consistency"))
    config = LoopConfig.from_settings("classifier", settings, classes=["mel", "nv"],
                                      recipe=base)
    return ClassifierTask(config)


def test_metadata_dropout_hides_fields_at_the_recipe_rates():
    task = _classifier_task(metadata_dropout=0.2, metadata_drop_all=0.3)
    n = 4000
    encoded = EncodedMetadata(np.tile([[0.5, 0.0]], (n, 1)).astype(np.float32),
                              np.full(n, 2), np.full(n, 5))
    dropped = task._drop_metadata(encoded)
    unknown_age, _, unknown_sex, unknown_site = task.vocab.encode(None, None, None)
    age_hidden = np.asarray(dropped.age)[:, 1] == 1.0
    sex_hidden = np.asarray(dropped.sex) == unknown_sex
    site_hidden = np.asarray(dropped.site) == unknown_site
    all_hidden = age_hidden & sex_hidden & site_hidden
    # Each field: 0.3 + 0.7 * 0.2 = 0.44; all three together at least the 0.3 of drop_all.
    for hidden in (age_hidden, sex_hidden, site_hidden):
        assert hidden.mean() == pytest.approx(0.44, abs=0.03)
    assert all_hidden.mean() == pytest.approx(0.3 + 0.7 * 0.2**3, abs=0.03)
    assert np.all(np.asarray(dropped.age)[age_hidden, 0] == unknown_age)
    kept = _classifier_task()._drop_metadata(encoded)
    assert kept is encoded  # the tiny recipe drops nothing


def test_shades_of_gray_removes_a_colour_cast_and_leaves_grey_alone():
    rng = torch.Generator().manual_seed(0)
    scene = torch.rand(2, 3, 32, 32, generator=rng) * 0.6 + 0.2
    cast = scene * torch.tensor([1.0, 0.8, 0.6]).view(1, 3, 1, 1)
    # The cast goes: both come out the same up to one overall brightness factor.
    ratio = shades_of_gray(cast) / shades_of_gray(scene)
    assert torch.allclose(ratio, ratio.mean(dim=(1, 2, 3), keepdim=True), atol=1e-4)
    assert not torch.allclose(cast / scene, (cast / scene).mean(dim=(1, 2, 3), keepdim=True))
    grey = torch.full((1, 3, 8, 8), 0.5)
    assert torch.allclose(shades_of_gray(grey), grey, atol=1e-5)
    with pytest.raises(ValueError, match="color_constancy"):
        normalize(grey, (0, 0, 0), (1, 1, 1), "retinex")


def test_the_shared_lesion_branch_classifies_and_explains_with_one_encoder():
    from raysky.explain.gradcam import GradCAMExplainer

    shared = create_classifier("tiny", lesion_branch="shared").eval()
    paper = create_classifier("tiny").eval()
    assert shared.lesion_encoder is None and paper.lesion_encoder is not None
    def count(module):
        return sum(p.numel() for p in module.parameters())

    # One encoder fewer, and no projection of its map: the rest is the same model.
    assert count(shared) == count(paper) - count(paper.lesion_encoder) - count(paper.lesion_proj)
    image = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 1, 64, 64)
    mask[:, :, 16:40, 20:44] = 1
    out = shared.forward_features(image, mask)
    assert out.logits.shape == (2, 7) and out.lesion_features is None
    # The mask matters: the lesion token is pooled from where the mask is.
    other = torch.zeros_like(mask)
    other[:, :, 40:60, 2:20] = 1
    assert not torch.allclose(shared(image, mask), shared(image, other))
    explanation = GradCAMExplainer(shared)(image, mask)
    assert explanation.heatmaps.shape == (2, 64, 64)
    assert torch.allclose(explanation.probabilities, torch.softmax(out.logits, 1), atol=1e-5)
    with pytest.raises(ValueError, match="lesion_branch"):
        create_classifier("tiny", lesion_branch="both")


def test_frozen_early_layers_stay_fixed_and_in_eval_mode():
    model = create_segmenter("lite")
    frozen = freeze_early_layers(model, 1)
    encoder = model.encoder
    assert frozen == [encoder.conv_stem, encoder.bn1, encoder.blocks[0]]
    assert not any(p.requires_grad for layer in frozen for p in layer.parameters())
    assert all(p.requires_grad for p in encoder.blocks[1].parameters())
    model.train()
    keep_frozen_in_eval(frozen)
    assert not encoder.bn1.training and encoder.blocks[1].training
    dense = create_classifier("tiny")
    assert len(freeze_early_layers(dense, 2)) == 2 * 4  # conv0, norm0, block 1, transition 1
    assert freeze_early_layers(create_segmenter("tiny"), None) == []


def test_the_moving_average_follows_the_weights_and_is_what_gets_evaluated():
    model = torch.nn.Linear(2, 1)
    assert make_average(model, 0.0) is None and averaged(model, None) is model
    average = make_average(model, 0.5)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    average.update_parameters(model)
    # The first update copies; the second moves halfway towards the new weights.
    with torch.no_grad():
        model.weight.add_(1.0)
    average.update_parameters(model)
    assert torch.allclose(averaged(model, average).weight, start + 1.5)


def test_the_memory_layout_is_the_faster_measured_step():
    model = torch.nn.Conv2d(3, 4, 3)
    seen = []

    def step(probe, memory_format):
        seen.append(memory_format)
        assert probe.weight.is_contiguous(memory_format=memory_format)

    chosen, timing = choose_memory_format(model, step, torch.device("cpu"), trials=1)
    assert chosen in MEMORY_LAYOUTS
    assert set(timing) == {"nchw", "channels_last"}
    assert set(seen) == {torch.channels_last, torch.contiguous_format}
    assert choose_memory_format(model, step, torch.device("cuda"))[0] == "channels_last"


def test_recipes_round_trip_through_their_dict_form():
    for preset in PRESETS.values():
        for recipe in (preset.segmenter_recipe, preset.classifier_recipe):
            assert recipe_from_dict(recipe_to_dict(recipe)) == recipe
    assert recipe_from_dict(None) == recipe_from_dict({})
    with pytest.raises(ValueError, match="unknown config fields"):
        recipe_from_dict({"learning_rate": 1.0})
