from cxrdist.cli import main

raise SystemExit(main())
