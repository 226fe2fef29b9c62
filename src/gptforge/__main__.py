from gptforge.cli import main
from gptforge.parallel.exit import run_main

raise SystemExit(run_main(main))
