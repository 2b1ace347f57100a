"""Stage 3, the layers of a descriptor: region grid, pooling, region weights, whitening.

``functional``  the math as pure tensor functions: R-MAC grid, ROI max-pool, MAC, SPoC, GeM,
                R-MAC, the triplet loss (each citing its paper)
``pooling``     thin ``nn.Module`` heads over them; REMAP streams with learnable region weights α
``proposals``   learned region proposals (RPN) pooled as R-MAC (Gordo et al.)
``whitening``   PCA-whitening, the FC layer's initialisation
"""
