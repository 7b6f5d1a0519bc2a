"""Export a run's networks in diffusers' format: python export.py run=DIR [part=denoiser|autoencoder] [out=DIR]"""

from ldm.commands.export import main

if __name__ == "__main__":
    main()
