"""The comparisons ktm runs on itself: speed benchmarks (``bench``), the Pareto grid
(``pareto``, ``pareto_report``, ``frontier``), the LLMLingua-2 baseline (``lingua``) and the
demos (``demo``). Library code never imports from here."""
