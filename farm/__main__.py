from farm.cli.main import main

raise SystemExit(main())
