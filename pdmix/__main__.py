from pdmix.cli import main

raise SystemExit(main())
