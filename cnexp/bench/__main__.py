import sys

if "--loader" in sys.argv[1:]:  # the data path alone (loader.py)
    from cnexp.bench.loader import main
else:
    from cnexp.bench.cli import main  # the tiny world and --sd

main()
