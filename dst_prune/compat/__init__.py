"""The seed's API and models: `DSModel`, activation sparsity, LeNet-300-100, CIFAR WRN/ResNet, the char-RNN."""
