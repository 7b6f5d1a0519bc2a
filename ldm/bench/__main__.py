from ldm.bench.cli import main

main()
