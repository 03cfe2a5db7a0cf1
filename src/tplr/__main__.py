from tplr.cli import main

raise SystemExit(main())
