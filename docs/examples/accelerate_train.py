"""accelerate's `complete_cv_example.py`, trained sparse with RigL: the same structure, six lines of dst_prune
(marked `# dst_prune`), and synthetic images instead of the Oxford pets so that it runs anywhere.

    accelerate launch --multi_gpu --num_processes 2 docs/examples/accelerate_train.py --cpu \
        --checkpointing_steps 3 --output_dir out
    accelerate launch --multi_gpu --num_processes 2 docs/examples/accelerate_train.py --cpu \
        --checkpointing_steps 3 --output_dir out --resume_from_checkpoint out/step_9

`tests/test_accelerate.py` runs it so on 2 CPU processes: the resumed run ends bitwise equal to the uninterrupted one.
"""

import argparse
import os

import torch
from accelerate import Accelerator
from timm import create_model
from torch.optim.lr_scheduler import OneCycleLR
from torch.utils.data import DataLoader, TensorDataset

import dst_prune  # dst_prune
from dst_prune.integrations import accelerate as dst_accelerate  # dst_prune


def synthetic_images(count, image_size, generator):
    """Images whose class is the brightest of 4 quadrants: learnable in a few steps."""
    images = torch.rand(count, 3, image_size, image_size, generator=generator)
    half = image_size // 2
    labels = torch.randint(0, 4, (count,), generator=generator)
    for i, label in enumerate(labels.tolist()):
        row, col = divmod(label, 2)
        images[i, :, row * half:(row + 1) * half, col * half:(col + 1) * half] += 0.5
    return images, labels


def training_function(config, args):
    # Initialize accelerator
    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision)

    # Sample hyper-parameters for learning rate, batch size, seed and a few other HPs
    lr = config["lr"]
    num_epochs = int(config["num_epochs"])
    seed = int(config["seed"])
    batch_size = int(config["batch_size"])
    image_size = config["image_size"]

    # Parse out whether we are saving every epoch or after a certain number of batches
    if args.checkpointing_steps == "epoch" or args.checkpointing_steps is None:
        checkpointing_steps = args.checkpointing_steps
    elif args.checkpointing_steps.isdigit():
        checkpointing_steps = int(args.checkpointing_steps)
    else:
        raise ValueError(f"--checkpointing_steps must be a number or `epoch`; received {args.checkpointing_steps}.")

    # Set the seed before building the data and the model
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train_dataset = TensorDataset(*synthetic_images(48, image_size, generator))
    eval_dataset = TensorDataset(*synthetic_images(16, image_size, generator))

    # Instantiate dataloaders.
    train_dataloader = DataLoader(train_dataset, shuffle=False, batch_size=batch_size)
    eval_dataloader = DataLoader(eval_dataset, shuffle=False, batch_size=batch_size)

    # Instantiate the model (a tiny ResNet of timm's, from scratch)
    model = create_model("test_resnet", pretrained=False, num_classes=4)
    model = model.to(accelerator.device)

    # We normalize the batches of images to be a bit faster.
    mean = torch.tensor(model.default_cfg["mean"])[None, :, None, None].to(accelerator.device)
    std = torch.tensor(model.default_cfg["std"])[None, :, None, None].to(accelerator.device)

    # Instantiate optimizer
    optimizer = torch.optim.Adam(params=model.parameters(), lr=lr / 25)

    # Instantiate learning rate scheduler
    lr_scheduler = OneCycleLR(optimizer=optimizer, max_lr=lr, epochs=num_epochs, steps_per_epoch=len(train_dataloader))

    # Make the model sparse: RigL over the steps each process takes (not len(train_dataloader), which counts the
    # batches of all processes before prepare)
    dst = dst_prune.apply(model, sparsity=0.8, method="rigl", optimizer=optimizer, update_every=2,  # dst_prune
                          total_steps=dst_accelerate.total_steps(accelerator, train_dataloader, num_epochs))
    dst.prepare_for_ddp()  # dst_prune

    # Prepare everything
    model, optimizer, train_dataloader, eval_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, lr_scheduler
    )
    dst_accelerate.register(accelerator, dst)  # dst_prune: save_state/load_state carry the controller
    # We need to keep track of how many total steps we have iterated over
    overall_step = 0
    # We also need to keep track of the starting epoch so files are named properly
    starting_epoch = 0

    # Potentially load in the weights and states from a previous save
    if args.resume_from_checkpoint:
        accelerator.print(f"Resumed from checkpoint: {args.resume_from_checkpoint}")
        accelerator.load_state(args.resume_from_checkpoint)  # the controller too, checked first
        # Extract `epoch_{i}` or `step_{i}`
        training_difference = os.path.splitext(os.path.basename(args.resume_from_checkpoint))[0]
        if "epoch" in training_difference:
            starting_epoch = int(training_difference.replace("epoch_", "")) + 1
            resume_step = None
        else:
            resume_step = int(training_difference.replace("step_", ""))
            starting_epoch = resume_step // len(train_dataloader)
            resume_step -= starting_epoch * len(train_dataloader)
        overall_step = starting_epoch * len(train_dataloader)

    # Now we train the model
    for epoch in range(starting_epoch, num_epochs):
        model.train()
        if args.resume_from_checkpoint and epoch == starting_epoch and resume_step is not None:
            # We need to skip steps until we reach the resumed step
            active_dataloader = accelerator.skip_first_batches(train_dataloader, resume_step)
            overall_step += resume_step
        else:
            # After the first iteration though, we need to go back to the original dataloader
            active_dataloader = train_dataloader
        for images, labels in active_dataloader:
            outputs = model((images - mean) / std)
            loss = torch.nn.functional.cross_entropy(outputs, labels)
            accelerator.backward(loss)
            optimizer.step()
            dst.step(skipped=accelerator.optimizer_step_was_skipped)  # dst_prune
            lr_scheduler.step()
            optimizer.zero_grad()
            overall_step += 1
            if isinstance(checkpointing_steps, int) and overall_step % checkpointing_steps == 0:
                accelerator.save_state(os.path.join(args.output_dir, f"step_{overall_step}"))
        model.eval()
        accurate = 0
        num_elems = 0
        for images, labels in eval_dataloader:
            with torch.no_grad():
                predictions = model((images - mean) / std).argmax(dim=-1)
            predictions, references = accelerator.gather_for_metrics((predictions, labels))
            accurate_preds = predictions == references
            num_elems += accurate_preds.shape[0]
            accurate += accurate_preds.long().sum()
        eval_metric = accurate.item() / num_elems
        # Use accelerator.print to print only on the main process.
        accelerator.print(f"epoch {epoch}: {100 * eval_metric:.2f} (sparsity {dst.sparsity:.3f})")
        if checkpointing_steps == "epoch":
            accelerator.save_state(os.path.join(args.output_dir, f"epoch_{epoch}"))

    accelerator.end_training()


def main():
    parser = argparse.ArgumentParser(description="complete_cv_example.py, trained sparse with dst_prune.")
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16", "fp8"])
    parser.add_argument("--cpu", action="store_true", help="If passed, will train on the CPU.")
    parser.add_argument("--checkpointing_steps", type=str, default=None,
                        help="Save the state every n steps, or 'epoch' at the end of every epoch.")
    parser.add_argument("--output_dir", type=str, default=".", help="Where the checkpoint folders go.")
    parser.add_argument("--resume_from_checkpoint", type=str, default=None,
                        help="A checkpoint folder (step_<n> or epoch_<n>) to continue from.")
    args = parser.parse_args()
    config = {"lr": 3e-2, "num_epochs": 3, "seed": 42, "batch_size": 4, "image_size": 16}
    training_function(config, args)


if __name__ == "__main__":
    main()
