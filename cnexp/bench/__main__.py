from cnexp.bench.tiny import main

main()
