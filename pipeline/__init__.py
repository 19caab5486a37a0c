"""animeface-vae: scrape -> crop -> pack -> train -> sample / evaluate. One module per stage."""
