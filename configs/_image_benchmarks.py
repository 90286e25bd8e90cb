"""The standard image benchmarks of domain adaptation and fine-tuning, as configs on image folders.

One table (`BENCHMARKS`) describes Office-31, Office-Home, VisDA-2017, DomainNet and PACS: the
folder of each domain under ``data.root``, the classes, the default pair, the protocol and the
training budget. `get_config` turns a benchmark and a variant string into either

* ``task=da`` (default): unsupervised domain adaptation with a recipe of configs/da.py
  (``method=NAME``, ``recommended`` or a sweep through `get_sweep`) from a labelled ``source``
  domain to an unlabelled ``target`` domain, or
* ``task=finetune``: supervised fine-tuning on ``shots`` labelled images per class of the
  ``target`` domain with a variant of configs/finetune.py, evaluated on held-out target images.

Domain folder names and class lists are those of Transfer-Learning-Library
(github:thuml/Transfer-Learning-Library, ``tllib/vision/datasets/office31.py``, ``officehome.py``,
``visda2017.py``, ``domainnet.py``, ``pacs.py``); its task codes (``A``, ``Ar``, ``Synthetic``,
``c``, ...) are accepted as aliases of the domain names. Protocols and optimiser settings follow
its examples (``examples/domain_adaptation/image_classification/*.py``, ``*.sh`` and
``utils.py``; ``tllib/modules/classifier.py``):

* Office-31, Office-Home, PACS: every image of the source (labelled) and of the target
  (unlabelled) domain trains, and every target image is evaluated (``data.folder.split=all``).
* VisDA-2017: ``train`` (synthetic) -> ``validation`` (real), every image.
* DomainNet: the source's train split, the target's train split (unlabelled) and evaluation on the
  target's test split: each domain folder holds ``train/`` and ``test/`` (BUILD.md shows how to
  build them from the official lists).
* Images: TLlib's resize to 256 then ``random_resized_crop,flip`` to 224 for training (VisDA-2017:
  TLlib's ``cen.crop``, the centre crop and ``flip``), the centre crop for evaluation
  (`tljax.data.transforms`); ResNet-50 on ImageNet statistics by default, or another backbone
  (``backbone=vit_s16|vit_b16|convnext_t|vgg16``, `BACKBONES`: its transferred layers and its
  checkpoints' input statistics).
* SGD (momentum 0.9, Nesterov, weight decay 1e-3), lr 0.01 annealed as
  ``0.01 (1 + 0.001 i)^-0.75`` at iteration ``i`` (the ``dann`` schedule over progress
  ``p = i / train.steps`` with ``lr.alpha`` = 0.001 x the benchmark's steps; a run given fewer
  ``train.steps`` anneals as far, sooner), the backbone at 0.1x the head's learning rate
  (``transfer.lr_mults``), 32 images per domain per step, ``epochs x 1000`` iterations
  (DomainNet: 30 x 2500), the discriminator and auxiliary heads 1024-1024 wide.

Fine-tuning keeps configs/finetune.py's budget and variants (500 steps of 32 images, SGD 0.9 with
a cosine schedule from 0.01) with TLlib's fine-tuning weight decay 5e-4 and 0.1x backbone lr
(``examples/task_adaptation/image_classification/erm.py --finetune``); a domain without
``test/`` is split per class, half for the shots and half for evaluation
(``data.folder.split=auto``, ``test_fraction=0.5``); ``variant=scratch`` uses GroupNorm, and
``variant=output`` is not offered (it distils towards a freshly drawn head).

Differences from TLlib to keep in mind: the network is torchvision's ResNet-50 with its BatchNorm
frozen (folded from the ImageNet statistics, ``model.norm=affine``) and no bottleneck layer
between the pooled features and the head (TLlib trains BatchNorm and adds a 256-wide
bottleneck); TLlib's VisDA and DomainNet tables use ResNet-101, which tljax does not have; one
optimiser serves every recipe (TLlib tunes a few, e.g. MCC's lr 0.005).

ImageNet weights are never downloaded: ``transfer.init_from`` is None until set to a converted
torchvision checkpoint (BUILD.md "Pretrained ResNets"); without it the ResNet starts from random
weights (then also set ``model.norm=group``: frozen affine layers do not normalise anything).

Class folders are not compared with the class lists here: ``get_config`` runs before
``--config.data.root`` is applied, so it cannot look at the folders. The data layer checks that
source and target hold the same class folders (label i is the same class in both domains), and the
labels are checked against ``model.num_classes`` before the first step (a folder with more
classes stops there; one missing a class in both domains is not caught). The config files'
docstrings say so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import ml_collections
from ml_collections.config_dict import FieldReference

from configs import da, finetune
from configs._common import train_block, transfer_block
from tljax.config_utils import parse_arg
from tljax.data import folders
from tljax.methods import shot
from tljax.validate import ConfigError


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One image benchmark: where its domains are, its classes, protocol and budget.

    Attributes:
      name: the benchmark's name, for messages.
      folders: domain name -> its folder of class folders, relative to ``data.root``.
      aliases: TLlib's task codes -> domain names.
      classes: the class folder names (TLlib's ``CLASSES``); labels follow their sorted order.
      source: the default source domain.
      target: the default target domain.
      split: ``data.folder.split`` for adaptation: ``'all'`` uses every image in every split;
        ``'auto'`` reads each domain's ``train/`` and ``test/`` subfolders.
      eval_split: the split of both domains that is evaluated.
      steps: training steps (TLlib's epochs x iterations per epoch).
      augment: ``data.folder.augment`` of the training images.
    """

    name: str
    folders: Mapping[str, str]
    aliases: Mapping[str, str]
    classes: tuple[str, ...]
    source: str
    target: str
    split: str
    eval_split: str
    steps: int
    augment: str = "random_resized_crop,flip"  # TLlib's default --train-resizing.

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def domain(self, name: str, field: str) -> str:
        """The domain a variant value names (a domain name or TLlib's code for it).

        Args:
          name: the value.
          field: the variant key, for the message.

        Returns:
          The domain name.

        Raises:
          ConfigError: no such domain in this benchmark (the message lists them).
        """
        domain = self.aliases.get(name, name)
        if domain not in self.folders:
            codes = ", ".join(f"{code}={value}" for code, value in self.aliases.items())
            raise ConfigError(
                f"{field}={name!r}: {self.name} has domains {', '.join(self.folders)} "
                f"(TLlib's codes: {codes})."
            )
        return domain

    def dataset(self, domain: str) -> str:
        """The ``folder:`` dataset name of a domain (relative: resolved under ``data.root``)."""
        return f"{folders.PREFIX}{self.folders[domain]}"


def _names(text: str) -> tuple[str, ...]:
    """Class names written space-separated (none has a space), in TLlib's order."""
    return tuple(text.split())


# tllib/vision/datasets/office31.py: <root>/<domain>/images/<class>/*.jpg.
OFFICE31 = Benchmark(
    name="Office-31",
    folders={"amazon": "amazon/images", "dslr": "dslr/images", "webcam": "webcam/images"},
    aliases={"A": "amazon", "D": "dslr", "W": "webcam"},
    classes=_names(
        "back_pack bike bike_helmet bookcase bottle calculator desk_chair desk_lamp "
        "desktop_computer file_cabinet headphones keyboard laptop_computer letter_tray "
        "mobile_phone monitor mouse mug paper_notebook pen phone printer projector punchers "
        "ring_binder ruler scissors speaker stapler tape_dispenser trash_can"
    ),
    source="amazon",
    target="webcam",
    split="all",
    eval_split="all",
    steps=20 * 1000,  # examples/.../dann.sh: --epochs 20, 1000 iterations per epoch.
)

# tllib/vision/datasets/officehome.py: <root>/<domain>/<class>/*.jpg.
OFFICE_HOME = Benchmark(
    name="Office-Home",
    folders={d: d for d in ("Art", "Clipart", "Product", "Real_World")},
    aliases={"Ar": "Art", "Cl": "Clipart", "Pr": "Product", "Rw": "Real_World"},
    classes=_names(
        "Drill Exit_Sign Bottle Glasses Computer File_Cabinet Shelf Toys Sink Laptop Kettle Folder "
        "Keyboard Flipflops Pencil Bed Hammer ToothBrush Couch Bike Postit_Notes Mug Webcam "
        "Desk_Lamp Telephone Helmet Mouse Pen Monitor Mop Sneakers Notebook Backpack Alarm_Clock "
        "Push_Pin Paper_Clip Batteries Radio Fan Ruler Pan Screwdriver Trash_Can Printer Speaker "
        "Eraser Bucket Chair Calendar Calculator Flowers Lamp_Shade Spoon Candles Clipboards "
        "Scissors TV Curtains Fork Soda Table Knives Oven Refrigerator Marker"
    ),
    source="Art",
    target="Clipart",
    split="all",
    eval_split="all",
    steps=30 * 1000,  # dann.sh: --epochs 30.
)

# tllib/vision/datasets/visda2017.py: <root>/train/<class>/*.png (synthetic renderings) and
# <root>/validation/<class>/*.jpg (real photos).
VISDA2017 = Benchmark(
    name="VisDA-2017",
    folders={"train": "train", "validation": "validation"},
    aliases={"Synthetic": "train", "Real": "validation"},
    classes=_names(
        "aeroplane bicycle bus car horse knife motorcycle person plant skateboard train truck"
    ),
    source="train",
    target="validation",
    split="all",
    eval_split="all",
    steps=30 * 1000,  # dann.sh: --epochs 30.
    # Every VisDA command of TLlib's scripts trains with --train-resizing cen.crop: the
    # evaluation's resize and centre crop, then the flip.
    augment="flip",
)

# tllib/vision/datasets/domainnet.py (its CLASSES, 345); <root>/<domain>/{train,test}/<class>/
# built from the official <domain>_{train,test}.txt lists (BUILD.md).
DOMAINNET_CLASSES = _names(
    "aircraft_carrier airplane alarm_clock ambulance angel animal_migration ant anvil apple arm "
    "asparagus axe backpack banana bandage barn baseball baseball_bat basket basketball bat "
    "bathtub beach bear beard bed bee belt bench bicycle binoculars bird birthday_cake blackberry "
    "blueberry book boomerang bottlecap bowtie bracelet brain bread bridge broccoli broom bucket "
    "bulldozer bus bush butterfly cactus cake calculator calendar camel camera camouflage campfire "
    "candle cannon canoe car carrot castle cat ceiling_fan cello cell_phone chair chandelier "
    "church circle clarinet clock cloud coffee_cup compass computer cookie cooler couch cow crab "
    "crayon crocodile crown cruise_ship cup diamond dishwasher diving_board dog dolphin donut door "
    "dragon dresser drill drums duck dumbbell ear elbow elephant envelope eraser eye eyeglasses "
    "face fan feather fence finger fire_hydrant fireplace firetruck fish flamingo flashlight "
    "flip_flops floor_lamp flower flying_saucer foot fork frog frying_pan garden garden_hose "
    "giraffe goatee golf_club grapes grass guitar hamburger hammer hand harp hat headphones "
    "hedgehog helicopter helmet hexagon hockey_puck hockey_stick horse hospital hot_air_balloon "
    "hot_dog hot_tub hourglass house house_plant hurricane ice_cream jacket jail kangaroo key "
    "keyboard knee knife ladder lantern laptop leaf leg light_bulb lighter lighthouse lightning "
    "line lion lipstick lobster lollipop mailbox map marker matches megaphone mermaid microphone "
    "microwave monkey moon mosquito motorbike mountain mouse moustache mouth mug mushroom nail "
    "necklace nose ocean octagon octopus onion oven owl paintbrush paint_can palm_tree panda pants "
    "paper_clip parachute parrot passport peanut pear peas pencil penguin piano pickup_truck "
    "picture_frame pig pillow pineapple pizza pliers police_car pond pool popsicle postcard potato "
    "power_outlet purse rabbit raccoon radio rain rainbow rake remote_control rhinoceros rifle "
    "river roller_coaster rollerskates sailboat sandwich saw saxophone school_bus scissors "
    "scorpion screwdriver sea_turtle see_saw shark sheep shoe shorts shovel sink skateboard skull "
    "skyscraper sleeping_bag smiley_face snail snake snorkel snowflake snowman soccer_ball sock "
    "speedboat spider spoon spreadsheet square squiggle squirrel stairs star steak stereo "
    "stethoscope stitches stop_sign stove strawberry streetlight string_bean submarine suitcase "
    "sun swan sweater swing_set sword syringe table teapot teddy-bear telephone television "
    "tennis_racquet tent The_Eiffel_Tower The_Great_Wall_of_China The_Mona_Lisa tiger toaster toe "
    "toilet tooth toothbrush toothpaste tornado tractor traffic_light train tree triangle trombone "
    "truck trumpet t-shirt umbrella underwear van vase violin washing_machine watermelon "
    "waterslide whale wheel windmill wine_bottle wine_glass wristwatch yoga zebra zigzag"
)
DOMAINNET = Benchmark(
    name="DomainNet",
    folders={d: d for d in ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")},
    aliases={d[0]: d for d in ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")},
    classes=DOMAINNET_CLASSES,
    source="clipart",
    target="painting",
    split="auto",
    eval_split="test",
    steps=30 * 2500,  # dann.sh: --epochs 30 -i 2500.
)

# tllib/vision/datasets/pacs.py: <root>/<domain>/<class>/*.jpg.
PACS = Benchmark(
    name="PACS",
    folders={d: d for d in ("art_painting", "cartoon", "photo", "sketch")},
    aliases={"A": "art_painting", "C": "cartoon", "P": "photo", "S": "sketch"},
    classes=_names("dog elephant giraffe guitar horse house person"),
    source="photo",
    target="art_painting",
    split="all",
    eval_split="all",
    steps=20 * 1000,  # No TLlib adaptation script for PACS: Office-31's budget.
)

BENCHMARKS = {
    "office31": OFFICE31,
    "office_home": OFFICE_HOME,
    "visda2017": VISDA2017,
    "domainnet": DOMAINNET,
    "pacs": PACS,
}
# The config files built here: they read image folders that are not shipped, so the tests that
# run every config on the embedded digits (or replay recorded runs) leave them to
# tests/test_image_benchmarks.py, which runs them on generated folders.
CONFIG_FILES = tuple(BENCHMARKS)

TASKS = ("da", "finetune")
# configs/finetune.py's variants that make sense from ImageNet weights to new classes; 'output'
# distils towards the starting network's predictions, which a freshly drawn head makes noise.
FINETUNE_VARIANTS = ("scratch", "finetune", "freeze", "copy", "l2sp", "feature")
# Per backbone (``backbone=`` variant): the layers transferred from the pretrained checkpoint and
# trained at BACKBONE_LR_MULT (everything but the new head), and the input statistics its
# checkpoints expect (timm's ViT checkpoints are AugReg's, on [-1, 1] inputs).
BACKBONES = {
    "resnet50": (("stem", "stage*"), "imagenet"),
    "vit_s16": (("embedding", "encoder"), "inception"),
    "vit_b16": (("embedding", "encoder"), "inception"),
    "convnext_t": (("stem", "stage*", "final_norm"), "imagenet"),
    "vgg16": (("block*", "fc6", "fc7"), "imagenet"),
}
BACKBONE_LR_MULT = 0.1
IMAGE_SIZE = 224
BATCH_SIZE = 32
LR_GAMMA = 0.001  # TLlib's --lr-gamma: lr = base (1 + gamma i)^-0.75.
EVAL_EVERY = 1000  # One TLlib epoch.
HEAD_WIDTHS = (1024, 1024)  # TLlib's DomainDiscriminator hidden_size and MCD's classifier head.
FINETUNE_TEST_FRACTION = 0.5  # Held-out target images per class when a domain has no test/.
FINETUNE_WEIGHT_DECAY = 5e-4  # examples/task_adaptation/image_classification/erm.py --wd.

_DA_KEYS = ("source", "method", "scale", "seeds", "scales")
_FINETUNE_KEYS = ("variant", "shots", "layers")


def get_config(benchmark: Benchmark, arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of one benchmark run.

    Args:
      benchmark: an entry of `BENCHMARKS`.
      arg: the variant string, e.g. ``'source=amazon,target=webcam,method=cdan'`` or
        ``'task=finetune,target=webcam,variant=l2sp,shots=3'``.

    Returns:
      The config (``data.root`` None: set it to the folder holding the domains).

    Raises:
      ConfigError: an unknown key, domain, method or variant, or a key of the other task.
    """
    values = _parse(benchmark, arg)
    if values["task"] == "finetune":
        return _finetune_config(benchmark, values)
    return _da_config(benchmark, values)


def get_sweep(benchmark: Benchmark, arg: str | None = None) -> list[dict]:
    """configs/da.py's sweep (every recipe, or the one named, over scales and seeds) on one pair.

    Args:
      benchmark: an entry of `BENCHMARKS`.
      arg: the variant string; ``method`` defaults to ``all``.

    Returns:
      Sweep points named ``<recipe>_x<scale>_seed<seed>`` whose args are variants of
      `get_config`.

    Raises:
      ConfigError: ``task=finetune`` (there is no fine-tuning sweep), or a bad variant.
    """
    values = _parse(benchmark, arg, method="all")
    if values["task"] != "da":
        raise ConfigError("task=finetune has no sweep; the sweep runs the adaptation recipes.")
    keys = ("method", "source", "target", "seeds", "scales")
    points = da.get_sweep(",".join(f"{key}={values[key]}" for key in keys))
    return [{**point, "arg": f"{point['arg']},backbone={values['backbone']}"} for point in points]


def _parse(benchmark: Benchmark, arg: str | None, method: str = "recommended") -> dict:
    values = parse_arg(
        arg,
        task="da",
        source=benchmark.source,
        target=benchmark.target,
        method=method,
        scale=1.0,
        seed=0,
        seeds=3,
        scales=da.SCALES,
        variant="finetune",
        shots=3,
        layers=2,
        backbone="resnet50",
    )
    if values["backbone"] not in BACKBONES:
        raise ConfigError(f"backbone={values['backbone']!r}; choose one of {', '.join(BACKBONES)}.")
    if values["task"] not in TASKS:
        raise ConfigError(f"task={values['task']!r}; choose one of {', '.join(TASKS)}.")
    other = _FINETUNE_KEYS if values["task"] == "da" else _DA_KEYS
    misplaced = [key for key in _given_keys(arg) if key in other]
    if misplaced:
        raise ConfigError(f"task={values['task']} does not take {', '.join(misplaced)}.")
    values["source"] = benchmark.domain(values["source"], "source")
    values["target"] = benchmark.domain(values["target"], "target")
    return values


def _given_keys(arg: str | None) -> list[str]:
    return [item.partition("=")[0] for item in filter(None, (arg or "").split(","))]


def _da_config(benchmark: Benchmark, values: dict) -> ml_collections.ConfigDict:
    """configs/da.py's recipe, on the benchmark's folders with TLlib's ResNet-50 settings."""
    config = da.get_config(
        f"method={values['method']},scale={values['scale']},seed={values['seed']}"
    )
    config.data.source = benchmark.dataset(values["source"])
    config.data.target = benchmark.dataset(values["target"])
    config.data.eval_split = benchmark.eval_split
    _add_folder_fields(config, augment=benchmark.augment, split=benchmark.split)
    config.model = model_block(benchmark.num_classes, values["backbone"])
    config.da.discriminator_widths = HEAD_WIDTHS
    config.da.auxiliary_widths = HEAD_WIDTHS
    if config.method == "shot":
        # The ResNet's classifier is its 'head' layer; the authors' object-recognition weight.
        config.shot.head = "head"
        config.shot.pseudo_weight = shot.DEFAULTS["pseudo_weight"]
    config.train = train_block(benchmark.steps, BATCH_SIZE)
    config.optimizer = ml_collections.ConfigDict(
        dict(name="sgd", momentum=0.9, nesterov=True, weight_decay=1e-3)
    )
    # 'dann' anneals over progress p = i / steps: alpha = gamma * steps is TLlib's decay.
    config.lr = ml_collections.ConfigDict(
        dict(schedule="dann", base=0.01, alpha=LR_GAMMA * benchmark.steps, beta=0.75)
    )
    config.eval.every = EVAL_EVERY
    config.eval.batch_size = 256
    config.checkpoint.every = EVAL_EVERY
    backbone = BACKBONES[values["backbone"]][0]
    config.transfer = transfer_block(
        copy=backbone, lr_mults={pattern: BACKBONE_LR_MULT for pattern in backbone}
    )
    return config


def _finetune_config(benchmark: Benchmark, values: dict) -> ml_collections.ConfigDict:
    """configs/finetune.py's variant on ``shots`` labelled images per class of the target."""
    variant = values["variant"]
    if variant not in FINETUNE_VARIANTS:
        raise ConfigError(
            f"variant={variant!r}; task=finetune takes {', '.join(FINETUNE_VARIANTS)}."
        )
    config = finetune.get_config(
        f"variant={variant},shots={values['shots']},layers={values['layers']},seed={values['seed']}"
    )
    target = benchmark.dataset(values["target"])
    config.data.train = target
    config.data.eval_split = "test"
    config.data.eval_sets = {"target_test": target}
    # Shots come from the train split, accuracy from the held-out test split.
    _add_folder_fields(
        config, augment=benchmark.augment, split="auto", test_fraction=FINETUNE_TEST_FRACTION
    )
    config.model = model_block(benchmark.num_classes, values["backbone"])
    config.optimizer.weight_decay = FINETUNE_WEIGHT_DECAY
    config.transfer.init_from = None
    backbone = BACKBONES[values["backbone"]][0]
    if variant == "scratch":
        if values["backbone"] == "resnet50":
            config.model.norm = "group"  # Frozen affine layers normalise nothing from scratch.
    else:
        if tuple(config.transfer.copy) == ("*",):
            config.transfer.copy = backbone  # The head has the benchmark's classes: new.
        config.transfer.lr_mults = {pattern: BACKBONE_LR_MULT for pattern in backbone}
    return config


def _add_folder_fields(config: ml_collections.ConfigDict, **folder_fields) -> None:
    config.data.root = FieldReference(None, field_type=str)
    config.data.folder = folders.config_block(**folder_fields)


def model_block(num_classes: int, backbone: str = "resnet50") -> ml_collections.ConfigDict:
    """The ``model`` block: a backbone of `BACKBONES` at 224x224 on its checkpoints' statistics.

    Args:
      num_classes: outputs of the head.
      backbone: a key of `BACKBONES` (default torchvision's ResNet-50).

    Returns:
      The block (ResNet-50: ``norm='affine'``, the frozen BatchNorm a converted checkpoint
      fills).
    """
    block = ml_collections.ConfigDict(
        dict(
            name=backbone,
            num_classes=num_classes,
            image_size=(IMAGE_SIZE, IMAGE_SIZE),
            channels=3,
            normalize=BACKBONES[backbone][1],
            conv_impl="auto",
            conv_operands="float32",
            dtype="float32",
            microbatch="auto",
        )
    )
    if backbone == "resnet50":
        block.width = 64
        block.norm = "affine"
        block.batch_stats = "update"  # With norm='batch' (tljax/models/batch_norm.py).
    return block
