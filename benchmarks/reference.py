"""The yardstick: a plain copy of the classic Show-and-Tell tutorial loops (Udacity CVND project 2 / yunjey's
pytorch-tutorial image_captioning), kept only so the benchmarks can time showtell against it side by side.

What is copied, and kept as it is there (the costs are the point):

- EncoderCNN: a frozen torchvision ResNet-50 without its fc layer (params requires_grad=False, left in its default
  training mode as in the notebook), then a trainable Linear(2048, embed_size). The CNN runs on every batch.
- DecoderRNN: Embedding -> LSTM(embed 256, hidden 512, batch_first) -> Linear(hidden, vocab); the image feature is
  the first LSTM input; the output projection runs on every position; CrossEntropyLoss over all positions.
- Training step: a batch of 64 captions of one length (CVND's ``get_train_indices``: draw a caption length, then 64
  captions of that length), the images decoded from JPEG and put through the classic training transform (Resize
  256, RandomCrop 224, RandomHorizontalFlip, ToTensor, Normalize with the ImageNet numbers) in a DataLoader with
  num_workers=0 (the notebook's default), then encoder + decoder forward, backward, Adam.
- Inference: one image at a time (Resize 256, CenterCrop 224, ToTensor, Normalize), encoder, then ``sample()``:
  greedy, max length 20, a ``.item()`` per step, stop at <end>. As in the notebooks, there is no ``no_grad``.
  ``caption(path, max_len)`` lets a benchmark stop the untrained decoder where a trained one would emit <end>
  (random weights rarely do, so every caption would run all 20 steps).

ResNet-50 weights are random (``weights=None``): the cost of a forward pass does not depend on them, and the
benchmark stays offline. Tokenisation uses showtell's Vocabulary instead of nltk (not part of the timed work).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.utils.data as data
import torchvision.models as models
import torchvision.transforms as transforms
from PIL import Image
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

transform_train = transforms.Compose([
    transforms.Resize(256),
    transforms.RandomCrop(224),
    transforms.RandomHorizontalFlip(),
    transforms.ToTensor(),
    transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
])

transform_test = transforms.Compose([
    transforms.Resize(256),
    transforms.CenterCrop(224),
    transforms.ToTensor(),
    transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
])


class EncoderCNN(nn.Module):
    def __init__(self, embed_size: int):
        super().__init__()
        resnet = models.resnet50(weights=None)
        for param in resnet.parameters():
            param.requires_grad_(False)
        modules = list(resnet.children())[:-1]
        self.resnet = nn.Sequential(*modules)
        self.embed = nn.Linear(resnet.fc.in_features, embed_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.resnet(images)
        features = features.view(features.size(0), -1)
        features = self.embed(features)
        return features


class DecoderRNN(nn.Module):
    def __init__(self, embed_size: int, hidden_size: int, vocab_size: int, num_layers: int = 1):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, embed_size)
        self.lstm = nn.LSTM(embed_size, hidden_size, num_layers, batch_first=True)
        self.linear = nn.Linear(hidden_size, vocab_size)

    def forward(self, features: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        captions = captions[:, :-1]
        embeddings = self.word_embeddings(captions)
        inputs = torch.cat((features.unsqueeze(1), embeddings), dim=1)
        lstm_out, _ = self.lstm(inputs)
        outputs = self.linear(lstm_out)
        return outputs

    def sample(self, inputs: torch.Tensor, states=None, max_len: int = 20, end_id: int = 2) -> list[int]:
        """Accepts a pre-processed image tensor (inputs) and returns a predicted sentence (list of ids)."""
        output = []
        for _ in range(max_len):
            lstm_out, states = self.lstm(inputs, states)
            outputs = self.linear(lstm_out.squeeze(1))
            _, predicted = outputs.max(1)
            output.append(predicted.item())
            if predicted == end_id:
                break
            inputs = self.word_embeddings(predicted).unsqueeze(1)
        return output


class CaptionDataset(data.Dataset):
    """CVND's CoCoDataset (train mode) over (image path, token ids) pairs."""

    def __init__(self, items: Sequence[tuple[Path, list[int]]], transform, batch_size: int):
        self.items, self.transform, self.batch_size = list(items), transform, batch_size
        self.caption_lengths = [len(ids) for _, ids in self.items]

    def __getitem__(self, index: int):
        path, ids = self.items[index]
        image = Image.open(path).convert("RGB")
        image = self.transform(image)
        caption = torch.Tensor(ids).long()
        return image, caption

    def get_train_indices(self) -> list[int]:
        sel_length = np.random.choice(self.caption_lengths)
        all_indices = np.where([self.caption_lengths[i] == sel_length for i in np.arange(len(self.caption_lengths))])[0]
        indices = list(np.random.choice(all_indices, size=self.batch_size))
        return indices

    def __len__(self) -> int:
        return len(self.items)


class Reference:
    """The classic model, optimizer and loops; ``train_step()`` and ``caption(path)`` are what get timed."""

    def __init__(self, vocab_size: int, items: Sequence[tuple[Path, list[int]]] = (), batch_size: int = 64,
                 embed_size: int = 256, hidden_size: int = 512, end_id: int = 2, seed: int = 0):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        self.vocab_size, self.end_id = vocab_size, end_id
        self.encoder = EncoderCNN(embed_size)
        self.decoder = DecoderRNN(embed_size, hidden_size, vocab_size)
        self.criterion = nn.CrossEntropyLoss()
        params = list(self.decoder.parameters()) + list(self.encoder.embed.parameters())
        self.optimizer = torch.optim.Adam(params, lr=0.001)
        if not items:  # inference only
            return
        self.dataset = CaptionDataset(items, transform_train, batch_size)
        initial_sampler = data.sampler.SubsetRandomSampler(indices=self.dataset.get_train_indices())
        self.data_loader = data.DataLoader(dataset=self.dataset, num_workers=0, batch_sampler=data.sampler.BatchSampler(
            sampler=initial_sampler, batch_size=batch_size, drop_last=False))

    def train_step(self) -> tuple[float, int]:
        """One iteration of the CVND training loop; returns (loss, captions in the batch)."""
        indices = self.dataset.get_train_indices()
        new_sampler = data.sampler.SubsetRandomSampler(indices=indices)
        self.data_loader.batch_sampler.sampler = new_sampler
        images, captions = next(iter(self.data_loader))
        self.decoder.zero_grad()
        self.encoder.zero_grad()
        features = self.encoder(images)
        outputs = self.decoder(features, captions)
        loss = self.criterion(outputs.view(-1, self.vocab_size), captions.view(-1))
        loss.backward()
        self.optimizer.step()
        return loss.item(), captions.shape[0]

    def caption(self, path: str | Path, max_len: int = 20) -> list[int]:
        """CVND's inference for one image: transform, encoder, greedy ``sample`` of at most ``max_len`` steps."""
        self.encoder.eval()
        self.decoder.eval()
        image = transform_test(Image.open(path).convert("RGB")).unsqueeze(0)
        features = self.encoder(image).unsqueeze(1)
        return self.decoder.sample(features, max_len=max_len, end_id=self.end_id)
