"""What the tests share: generated data, processes and servers, AWS fakes, fault injection,
the pipeline configurations they run, and the tables suites report."""
