"""The eager reference models: output shapes for every image size, constructor
arguments kept as attributes, bad arguments rejected, one training step on the digits."""

import pytest
import torch
from torch import nn

from imggen_fast import data
from imggen_fast.models import CNN, VAE, ClassicVAE, Discriminator, Generator, Reparameterize

IMAGE_SIZES = [8, 16, 32, 64]


@pytest.mark.parametrize("image_size", IMAGE_SIZES)
@pytest.mark.parametrize("channels", [1, 3])
def test_generator_shapes(image_size, channels):
    generator = Generator(image_size=image_size, channels=channels)
    images = generator(generator.sample_noise(2))
    assert images.shape == (2, channels, image_size, image_size)
    assert images.abs().max() <= 1.0
    assert (generator.image_size, generator.channels, generator.noise_dim) == (image_size, channels, 100)


def test_generator_default_architecture():
    generator = Generator()
    linears = [m for m in generator.dense if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linears] == [128, 128, 256, 256, 512, 512, 1024, 1024, 4 * 4 * 512]
    transposed = [m for m in generator.upsample if isinstance(m, nn.ConvTranspose2d)]
    assert [(m.out_channels, m.kernel_size, m.stride) for m in transposed] == [
        (512, (3, 3), (1, 1)), (256, (4, 4), (2, 2)), (128, (4, 4), (2, 2)), (64, (4, 4), (2, 2)), (3, (4, 4), (2, 2))]
    activations = [m for m in generator.modules() if isinstance(m, nn.LeakyReLU)]
    assert len(activations) == 8 + 4 and all(m.negative_slope == 0.2 for m in activations)
    assert isinstance(generator.upsample[-1], nn.Tanh)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("image_size", IMAGE_SIZES)
def test_discriminator_returns_one_logit(kind, image_size):
    discriminator = Discriminator(kind=kind, image_size=image_size, channels=3)
    logits = discriminator(torch.randn(3, 3, image_size, image_size))
    assert logits.shape == (3, 1)
    assert (discriminator.kind, discriminator.image_size, discriminator.channels) == (kind, image_size, 3)


def test_discriminator_architectures():
    mlp = Discriminator("mlp")
    assert [m.out_features for m in mlp.layers if isinstance(m, nn.Linear)] == [1024, 512, 256, 128, 64, 1]
    conv = Discriminator("conv", image_size=64)
    assert [m.out_channels for m in conv.layers if isinstance(m, nn.Conv2d)] == [64, 128, 256, 512, 1]


@pytest.mark.parametrize("image_size", IMAGE_SIZES)
@pytest.mark.parametrize("channels", [1, 3])
def test_dcgan_shapes(image_size, channels):
    generator = Generator(image_size=image_size, channels=channels, noise_dim=7, kind="dcgan", width=4)
    images = generator(generator.sample_noise(2))
    assert images.shape == (2, channels, image_size, image_size) and images.abs().max() <= 1.0
    discriminator = Discriminator("dcgan", image_size=image_size, channels=channels, width=4)
    assert discriminator(images).shape == (2, 1)
    # One stride-2 block per doubling: the number of blocks follows the size.
    transposed = [m for m in generator.modules() if isinstance(m, nn.ConvTranspose2d)]
    convolutions = [m for m in discriminator.modules() if isinstance(m, nn.Conv2d)]
    assert len(transposed) == len(convolutions) == (image_size // 4).bit_length()


def test_dcgan_is_the_paper_architecture_at_64():
    """Radford et al. / PyTorch's DCGAN example: ngf = ndf = 64, nz = 100, no biases,
    BatchNorm after every layer but G's last and D's first and last."""
    generator, discriminator = Generator(kind="dcgan"), Discriminator("dcgan")
    layers = list(generator.upsample)
    assert isinstance(layers[0], nn.Unflatten) and len(generator.dense) == 0
    transposed = [m for m in layers if isinstance(m, nn.ConvTranspose2d)]
    assert [(m.in_channels, m.out_channels, m.stride, m.padding) for m in transposed] == [
        (100, 512, (1, 1), (0, 0)), (512, 256, (2, 2), (1, 1)), (256, 128, (2, 2), (1, 1)), (128, 64, (2, 2), (1, 1)),
        (64, 3, (2, 2), (1, 1))]
    assert all(m.kernel_size == (4, 4) and m.bias is None for m in transposed)
    assert [type(m) for m in layers[1:]] == [nn.ConvTranspose2d, nn.BatchNorm2d, nn.ReLU] * 4 + [nn.ConvTranspose2d,
                                                                                                 nn.Tanh]
    assert all(m.inplace for m in layers if isinstance(m, nn.ReLU))
    convolutions = [m for m in discriminator.layers if isinstance(m, nn.Conv2d)]
    assert [(m.in_channels, m.out_channels) for m in convolutions] == [(3, 64), (64, 128), (128, 256), (256, 512),
                                                                      (512, 1)]
    assert all(m.kernel_size == (4, 4) and m.bias is None for m in convolutions)
    assert [type(m) for m in discriminator.layers] == [nn.Conv2d, nn.LeakyReLU] + [
        nn.Conv2d, nn.BatchNorm2d, nn.LeakyReLU] * 3 + [nn.Conv2d, nn.Flatten]
    assert all(m.negative_slope == 0.2 and m.inplace for m in discriminator.layers if isinstance(m, nn.LeakyReLU))
    # The parameter counts PyTorch's DCGAN example prints for these settings.
    assert sum(p.numel() for p in generator.parameters()) == 3_576_704
    assert sum(p.numel() for p in discriminator.parameters()) == 2_765_568


def test_dcgan_initialisation():
    torch.manual_seed(0)
    generator = Generator(kind="dcgan", width=16)
    weights = torch.cat([m.weight.flatten() for m in generator.modules() if isinstance(m, nn.ConvTranspose2d)])
    assert abs(weights.mean()) < 1e-3 and abs(weights.std() - 0.02) < 1e-3
    norms = [m for m in generator.modules() if isinstance(m, nn.BatchNorm2d)]
    scales = torch.cat([m.weight.detach() for m in norms])
    assert abs(scales.mean() - 1) < 5e-3 and 0.01 < scales.std() < 0.03
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in norms)


def test_classic_vae_shapes_and_loss():
    vae = ClassicVAE()
    images = torch.rand(3, 1, 28, 28)
    reconstruction, mu, logvar = vae(images)
    assert reconstruction.shape == (3, 784) and mu.shape == logvar.shape == (3, 20)
    assert 0 < reconstruction.min() and reconstruction.max() < 1
    loss = vae.loss(reconstruction, images, mu, logvar)
    assert loss.dim() == 0 and torch.isfinite(loss)


@pytest.mark.parametrize("image_size", IMAGE_SIZES)
def test_vae_shapes_and_loss(image_size):
    vae = VAE(image_size=image_size, channels=3, latent_dim=8)
    images = torch.rand(2, 3, image_size, image_size) * 2 - 1
    reconstruction, mu, logvar = vae(images)
    assert reconstruction.shape == images.shape
    assert mu.shape == logvar.shape == (2, 8)
    loss = vae.loss(images, beta=0.5)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert vae.sample(4).shape == (4, 3, image_size, image_size)
    assert (vae.image_size, vae.channels, vae.latent_dim) == (image_size, 3, 8)


def test_vae_loss_is_reconstruction_plus_beta_kl():
    torch.manual_seed(0)
    vae = VAE(image_size=8, channels=1, latent_dim=4).eval()  # eval: z = mu, no noise
    images = torch.rand(5, 1, 8, 8) * 2 - 1
    mu, logvar = vae.encode(images)
    reconstruction = vae.decode(mu)
    kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)).mean()
    expected = ((reconstruction - images) ** 2).sum() / 5 + 2.0 * kl
    torch.testing.assert_close(vae.loss(images, beta=2.0), expected)
    bernoulli = VAE(image_size=8, channels=1, latent_dim=4, reconstruction="bernoulli").eval()
    assert torch.isfinite(bernoulli.loss(images))


def test_reparameterize_samples_in_training_and_not_in_eval():
    module = Reparameterize()
    mu, logvar = torch.zeros(1000, 4), torch.zeros(1000, 4)
    z, kl = module(mu, logvar)
    assert 0.9 < z.std() < 1.1 and kl == 0
    z_eval, _ = module.eval()(mu, logvar)
    assert torch.equal(z_eval, mu)
    z_sampled, _ = Reparameterize(sample_in_eval=True).eval()(mu, logvar)
    assert z_sampled.std() > 0.9


@pytest.mark.parametrize("image_size", [8, 16, 32])
def test_cnn_shapes(image_size):
    model = CNN(image_size=image_size, channels=1, num_classes=10)
    assert model(torch.randn(4, 1, image_size, image_size)).shape == (4, 10)
    assert (model.image_size, model.channels, model.num_classes) == (image_size, 1, 10)


BAD_ARGUMENTS = [
    (lambda: Generator(image_size=48), "image_size must be a power of two >= 8"),
    (lambda: Generator(image_size=4), "image_size must be a power of two >= 8"),
    (lambda: Generator(channels=0), "channels must be a positive integer"),
    (lambda: Discriminator(kind="patch"), "kind must be one of 'mlp', 'conv', 'dcgan'"),
    (lambda: Generator(kind="conv"), "kind must be one of 'seed', 'dcgan'"),
    (lambda: Generator(width=32), "width applies to kind='dcgan' only"),
    (lambda: Discriminator("conv", width=32), "width applies to kind='dcgan' only"),
    (lambda: Discriminator("dcgan", width=0), "width must be a positive integer"),
    (lambda: Generator(image_size=12, kind="dcgan"), "image_size must be a power of two >= 8"),
    (lambda: ClassicVAE(latent_dim=0), "latent_dim must be a positive integer"),
    (lambda: VAE(latent_dim=0), "latent_dim must be a positive integer"),
    (lambda: VAE(reconstruction="laplace"), "reconstruction must be 'gaussian' or 'bernoulli'"),
    (lambda: CNN(image_size=30), "image_size must be divisible by 4"),
]


@pytest.mark.parametrize("build,message", BAD_ARGUMENTS)
def test_bad_arguments_are_rejected(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.fixture(scope="module")
def digit_batch():
    images, labels = next(iter(torch.utils.data.DataLoader(data.digits(image_size=16), batch_size=32)))
    return images, labels


def take_step(model, loss_fn):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    loss = loss_fn()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("kinds", [("seed", "conv"), ("dcgan", "dcgan")])
def test_one_gan_step_on_digits(digit_batch, kinds):
    images, _ = digit_batch
    generator = Generator(image_size=16, channels=1, kind=kinds[0])
    discriminator = Discriminator(kinds[1], image_size=16, channels=1)
    bce = nn.functional.binary_cross_entropy_with_logits
    fake = generator(generator.sample_noise(images.shape[0]))

    def discriminator_loss():
        real_logits, fake_logits = discriminator(images), discriminator(fake.detach())
        return bce(real_logits, torch.ones_like(real_logits)) + bce(fake_logits, torch.zeros_like(fake_logits))

    take_step(discriminator, discriminator_loss)

    def generator_loss():
        logits = discriminator(generator(generator.sample_noise(images.shape[0])))
        return bce(logits, torch.ones_like(logits))

    take_step(generator, generator_loss)


def test_one_vae_step_on_digits(digit_batch):
    images, _ = digit_batch
    vae = VAE(image_size=16, channels=1, latent_dim=8)
    take_step(vae, lambda: vae.loss(images))


def test_one_cnn_step_on_digits(digit_batch):
    images, labels = digit_batch
    model = CNN(image_size=16)
    take_step(model, lambda: nn.functional.cross_entropy(model(images), labels))
