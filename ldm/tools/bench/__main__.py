from ldm.tools.bench.cli import main

main()
